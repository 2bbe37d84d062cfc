"""The episode as one conversation in token ids (agent/episode.py), and SFT's sequences of it."""
import asyncio

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from agent import SYSTEM_PROMPT, AgentState, render_prompt
from agent.episode import ChatFormat, EpisodeContext, first_user_turn
from learners.data import IGNORE, episode_sequences, pack, response_nll
from rollout_workers import SCHEMA, EpisodeTask
from rollout_workers.worker import RolloutWorker

EPISODE = {"state": "episode", "admissible_commands": False, "max_context_tokens": 8192, "history_turns": 8}


def play(model: str, game, agent: str = "expert", max_steps: int = 6, prompt: dict = EPISODE, seed: int = 1):
    worker = RolloutWorker(0, 1, agent, model, max_steps=max_steps, prompt=prompt, policy=None)
    return asyncio.run(worker.play(EpisodeTask(game, 0, seed=seed)))


@pytest.fixture(scope="module")
def expert_steps(tiny_model, ood_games):
    return play(tiny_model, ood_games[0])


def test_an_episodes_prompts_extend_each_other_and_are_the_chat_templates_conversation(tiny_model, expert_steps):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    held: list[int] = []
    for t, step in enumerate(expert_steps):
        assert step.context_start == (t == 0) and not step.context_rule
        prompt = held + step.prompt_ids  # the previous prompt + its response + the new user turn
        assert tokenizer.decode(prompt) == step.prompt
        held = prompt + step.response_ids
    # The whole sequence is what the chat template makes of the conversation, token for token
    # in meaning: the system, the task and room, then each response and the game's answer.
    first = expert_steps[0]
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": first_user_turn(first.task, first.room, None)}]
    for step in expert_steps[:-1]:
        messages += [{"role": "assistant", "content": step.response}, {"role": "user", "content": step.observation}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(held[:-len(expert_steps[-1].response_ids)]) == rendered
    assert first.task in rendered and first.room.split(".")[0] in rendered


def test_sft_sequences_rebuilt_from_text_are_the_ids_the_worker_recorded(tiny_model, expert_steps):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    table = pa.Table.from_pylist([vars(s) for s in expert_steps], schema=SCHEMA)
    (sequence,), restarts = episode_sequences(table, ChatFormat(tokenizer), EPISODE, max_new_tokens=48)
    recorded = [i for s in expert_steps for i in s.prompt_ids + s.response_ids]
    assert sequence.input_ids == recorded and restarts == 0
    # The loss mask covers exactly the assistant turns: each response and its end-of-turn token.
    spans, current = [], []
    for token, label in zip(sequence.input_ids, sequence.labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans.append(current)
    assert spans == [s.response_ids for s in expert_steps]
    assert [tokenizer.decode(s) for s in spans] == [f"{s.response}<|im_end|>" for s in expert_steps]


def test_window_state_is_one_sequence_per_step_as_before(tiny_model, ood_games):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    window = {**EPISODE, "state": "window"}
    steps = play(tiny_model, ood_games[0], prompt=window, max_steps=3)
    assert all(s.context_start for s in steps)
    state = AgentState(steps[0].task, steps[0].room, steps[0].admissible_commands)
    for t, step in enumerate(steps):
        assert step.prompt == render_prompt(tokenizer, state, 8)
        assert step.prompt_ids == tokenizer.encode(step.prompt, add_special_tokens=False)
        state.advance(step.action, step.observation, steps[t + 1].admissible_commands if t + 1 < len(steps) else [])
    table = pa.Table.from_pylist([vars(s) for s in steps], schema=SCHEMA)
    sequences, _ = episode_sequences(table, ChatFormat(tokenizer), window, max_new_tokens=48)
    assert [e.input_ids for e in sequences] == [s.prompt_ids + s.response_ids for s in steps]


def test_the_context_rule_keeps_task_room_and_places_visited(tiny_model):
    chat = ChatFormat(AutoTokenizer.from_pretrained(tiny_model))
    room = "You are in the middle of a room. Looking quickly around you, you see a desk 1, a shelf 1 and a bed 1."
    context = EpisodeContext(chat, "examine the alarmclock with the desklamp.", room, [], max_tokens=400, reserve=20)
    places = ["desk 1", "shelf 1", "bed 1", "desk 1"]
    restarted = []
    for t in range(24):
        fed = context.next_input()
        assert len(fed.prompt_ids) + 20 <= 400
        restarted.append(fed.reset)
        place = places[t % len(places)]
        context.advance(chat.response(f"ACTION: go to {place}"), f"go to {place}",
                        f"You arrive at {place}. On the {place}, you see nothing.", [])
    fed = context.next_input()
    assert context.resets >= 2 and sum(restarted[1:]) + fed.reset == context.resets
    text = chat.tokenizer.decode(fed.prompt_ids)
    assert "examine the alarmclock with the desklamp." in text and room in text
    assert "Places visited so far: desk 1, shelf 1, bed 1." in text
    assert text.endswith("You arrive at desk 1. On the desk 1, you see nothing.<|im_end|>\n<|im_start|>assistant\n")


def test_a_response_cut_off_at_the_limit_is_closed_before_the_next_turn(tiny_model):
    chat = ChatFormat(AutoTokenizer.from_pretrained(tiny_model))
    context = EpisodeContext(chat, "look.", "A room.", [], max_tokens=1000, reserve=10)
    context.next_input()
    cut = chat.encode("REASON: the desk")  # no end-of-turn token: the sampling limit stopped it
    context.advance(cut, "look", "Nothing happens.", [])
    new = context.next_input().new_ids
    assert new[0] == chat.end_of_turn_id and chat.tokenizer.decode(new).startswith("<|im_end|>\n<|im_start|>user")


def test_a_packed_batch_gives_the_loss_and_gradient_of_its_episodes_one_by_one(tiny_model, expert_steps, ood_games):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    steps = expert_steps + play(tiny_model, ood_games[3], max_steps=4)
    table = pa.Table.from_pylist([vars(s) for s in steps], schema=SCHEMA)
    sequences, _ = episode_sequences(table, ChatFormat(tokenizer), EPISODE, max_new_tokens=48)
    assert len(sequences) == 2 and len(sequences[0].input_ids) != len(sequences[1].input_ids)

    packed = response_nll(model, pack(sequences))
    packed.backward()
    packed_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # One by one: each sequence's summed response-token loss, over all response tokens.
    total = sum(sum(label != IGNORE for label in e.labels[1:]) for e in sequences)
    alone = sum(response_nll(model, pack([e])) * sum(label != IGNORE for label in e.labels[1:]) for e in sequences)
    alone = alone / total
    alone.backward()
    assert packed.item() == pytest.approx(alone.item(), rel=1e-5)
    for name, param in model.named_parameters():
        assert torch.allclose(packed_grad[name], param.grad, atol=1e-5, rtol=1e-4), name


def test_a_worker_records_each_use_of_the_context_rule(tiny_model, ood_games):
    """A small context: the rule restarts the conversation, each restart is recorded once, on
    the step whose prompt it made, and that prompt is a whole new sequence."""
    steps = play(tiny_model, ood_games[1], agent="random", max_steps=12, prompt={**EPISODE, "max_context_tokens": 700})
    rules = [s.step for s in steps if s.context_rule]
    assert rules and all(steps[t].context_start for t in rules)
    assert [s.step for s in steps if s.context_start] == [0, *rules]
    assert all(len(s.prompt_ids) + 48 <= 700 for s in steps if s.context_start)


def test_stored_demonstrations_as_another_prompt_state_sees_them(tiny_model, ood_games, expert_steps):
    """The store keeps the ids of the run that played; a run rebuilds them for its own
    prompt section: exactly what its rollout workers record when the expert plays."""
    from rollout_workers.demonstrations import as_seen_by

    window = {**EPISODE, "state": "window"}
    stored = pa.Table.from_pylist([vars(s) for s in expert_steps], schema=SCHEMA)
    rebuilt = as_seen_by(stored, AutoTokenizer.from_pretrained(tiny_model), window, max_new_tokens=48).to_pylist()
    played = play(tiny_model, ood_games[0], prompt=window)
    columns = ["prompt", "prompt_ids", "context_start", "context_rule", "response_ids"]
    assert [{k: r[k] for k in columns} for r in rebuilt] == [{k: getattr(s, k) for k in columns} for s in played]
    same = as_seen_by(stored, AutoTokenizer.from_pretrained(tiny_model), EPISODE, max_new_tokens=48)
    assert same.drop(["act_seconds"]).equals(stored.drop(["act_seconds"]))
