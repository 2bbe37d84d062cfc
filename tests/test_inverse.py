"""InversePRM (transitions, balance, the loss, no outcome reward) and the exploration options."""
import asyncio
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from omegaconf import OmegaConf

from agent import SYSTEM_PROMPT, render_prompt, steer_prompt
from learners import build_transitions, train_inverse_prm, without_outcome
from learners.dpo import PairSampler
from learners.inverse import balance, implied_rewards, sequence_q, transition_sequences, transitions
from learners.qtargets import state_ids
from rollout_workers.records import episodes_in_order
from policy_server import GenerateResult, Generation
from prm_service.server import ScoreResult
from rollout_workers import RolloutWorker
from rollout_workers.worker import EpisodeTask
from tests.conftest import small_cfg
from tests.test_prm import PROMPT, episode, ids_of, table


def test_transitions_pair_each_step_with_the_next_and_end_terminal():
    steps = without_outcome(table(episode("t/a", 0, ["s0", "s1", "s2"], ["a", "b", "c"], won=True),
                                  episode("t/b", 0, ["u0"], ["d"], won=False)))
    episodes = transitions(steps, "policy")
    assert [[(r["step"], r["terminal"], r["kept"]) for r in rows] for rows in episodes] == [
        [(0, False, True), (1, False, True), (2, True, True)], [(0, True, True)]]
    assert {r["label"] for rows in episodes for r in rows} == {0.0}
    assert {r["label"] for rows in transitions(steps, "expert") for r in rows} == {1.0}
    # A successor that starts a new context (the context rule) leaves its transition out.
    restarted = steps.set_column(steps.schema.get_field_index("context_start"), "context_start",
                                 pa.array([True, False, True, True]))
    assert [r["kept"] for r in transitions(restarted, "policy")[0]] == [True, False, True]


def test_balance_cuts_the_larger_side_by_whole_episodes_and_keeps_order():
    pos = [(e, i) for e in range(2) for i in range(3)]  # 6 expert transitions in 2 episodes
    neg = [(e, i) for e in range(10) for i in range(4)]  # 40 policy transitions in 10 episodes
    kept_pos, kept_neg = balance(pos, neg, seed=0)
    assert kept_pos == pos and len(kept_neg) == 6 and kept_neg == sorted(kept_neg) and set(kept_neg) <= set(neg)
    episodes = sorted({e for e, _ in kept_neg})
    assert len(episodes) == 2  # one whole episode and the first 2 steps of another
    assert sorted(len([i for e, i in kept_neg if e == x]) for x in episodes) == [2, 4]
    assert all(i in (0, 1) for e, i in kept_neg if sum(x == e for x, _ in kept_neg) == 2)
    assert balance(pos, neg, seed=0) == (kept_pos, kept_neg) and balance(pos, neg, seed=1)[1] != kept_neg


def test_no_outcome_reward_reaches_inverse_prm(tmp_path):
    """The builders refuse step records that carry the outcome, and their output does not
    change when every outcome is flipped."""
    expert = [episode("e/0", 0, ["x0", "x1"], ["go", "take"], won=True)]
    policy = [episode("p/0", 0, ["y0", "y1", "y2"], ["look", "look", "look"], won=False),
              episode("p/1", 0, ["z0", "z1"], ["go", "open"], won=True)]
    with pytest.raises(ValueError, match="no outcome"):
        transitions(table(*policy), "policy")
    flipped = [[s.__class__(**{**vars(s), "won": not s.won, "reward": 1.0 - s.reward, "done": not s.done}) for s in e]
               for e in policy]
    asked: list[list[list[int]]] = []

    def sample_next(states: list[list[int]]) -> list[list[int]]:
        asked.append(states)
        return [ids_of("ACTION: next") + s[-2:] for s in states]

    tables = []
    for name, episodes in (("as-played", policy), ("flipped", flipped)):
        build_transitions(without_outcome(table(*expert)), without_outcome(table(*episodes)), sample_next,
                          tmp_path / name, val_fraction=0.0, seed=0)
        tables.append(pq.read_table(tmp_path / name / "transitions.parquet"))
    assert tables[0].equals(tables[1])
    rows = [r for r in tables[0].to_pylist() if r["kept"]]
    positives = [r for r in rows if r["source"] == "expert"]
    assert len(positives) == 2 == len(rows) - len(positives)  # balanced: 2 expert vs 5 policy transitions
    # a' of an expert transition is the policy's response at s' (the whole prompt); the terminal one has none.
    s1 = ids_of("x0") + ids_of("ACTION: go") + ids_of("x1")
    assert asked[0] == [s1] and positives[0]["next_response_ids"] == ids_of("ACTION: next") + s1[-2:]
    assert positives[1]["terminal"] and positives[1]["next_response_ids"] is None


def test_inverse_prm_rewards_from_one_pass_equal_the_per_transition_form(tiny_prm):
    """Q(s, a) and Q(s', a') of every kept transition, the expert's a' as a branch, from one
    pass over the episode: the same as each (state, action) scored as its own sequence."""
    from models.prm import last_token_scores, load_prm

    expert = without_outcome(table(episode("e/0", 0, ["x0", "x1", "x2"], ["go", "take", "put"], won=True)))
    policy = without_outcome(table(episode("p/0", 0, ["y0", "y1", "y2"], ["look", "go", "look"], won=False)))
    out = Path(tempfile.mkdtemp())
    build_transitions(expert, policy, lambda states: [ids_of(f"a{len(s)}") for s in states], out, 0.0, seed=0)
    table_ = pq.read_table(out / "transitions.parquet")
    model, _ = load_prm(tiny_prm)

    def q(ids):
        return last_token_scores(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()

    with torch.no_grad():
        episodes = episodes_in_order(table_)  # one context each: one sequence each, in the same order
        for seq, rows in zip(transition_sequences(table_, "train"), episodes, strict=True):
            got_q, got_next, terminal = sequence_q(model, seq, "cpu")
            states = state_ids(rows)
            want_q, want_next = [], []
            for i, r in enumerate(rows):
                want_q.append(q(states[i] + r["response_ids"]))
                nxt = None if r["terminal"] else r["next_response_ids"] or rows[i + 1]["response_ids"]
                want_next.append(0.0 if nxt is None else q(states[i + 1] + nxt))
            np.testing.assert_allclose(got_q.tolist(), want_q, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(got_next.tolist(), want_next, rtol=1e-4, atol=1e-4)
            assert terminal.tolist() == [False, False, True]


def test_implied_reward_by_hand():
    q, q_next = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 5.0])
    r = implied_rewards(q, q_next, torch.tensor([False, True]), gamma=0.9)
    assert r.tolist() == pytest.approx([2.0 - 0.9, 1.0])


@pytest.fixture(scope="module")
def toy_transitions(tiny_model, tmp_path_factory):
    """16 games: the expert takes the mug, the policy looks around; separable by the action."""
    from transformers import AutoTokenizer

    encode = AutoTokenizer.from_pretrained(tiny_model).encode
    states = [f"{PROMPT}You are in room {i}. Admissible commands: look, take mug {i}" for i in range(16)]
    expert = [episode(f"room{i}/e", 0, [s, " You hold it."], [f"take mug {i}", "look"], True, encode)
              for i, s in enumerate(states)]
    policy = [episode(f"room{i}/p", 0, [s, " Nothing happens."], ["look", "look"], False, encode)
              for i, s in enumerate(states)]
    out = tmp_path_factory.mktemp("transitions")
    summary = build_transitions(without_outcome(table(*expert)), without_outcome(table(*policy)),
                                lambda states: [encode("ACTION: look") for _ in states], out, val_fraction=0.25,
                                seed=0)
    assert summary["per_side"] == 32 and summary["terminal"] == {"expert": 16, "policy": 16}
    assert summary["val_games"] == 8  # 4 of 16 rooms, each with an expert and a policy game
    return out


def test_inverse_prm_learner_separates_expert_from_policy_transitions(ray_local, tiny_model, toy_transitions,
                                                                      tmp_path):
    cfg = small_cfg(**{"algorithm": "inverseprm", "learner.num_workers": 2, "prm.batch_size": 8,
                       "prm.micro_batch_size": 2, "prm.lr": 3e-3, "prm.warmup_steps": 1, "prm.epochs": 4,
                       "prm.checkpoint_every": 100, "critic.gamma": 0.9})
    report = train_inverse_prm(cfg, toy_transitions, tiny_model, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    n = len(records) // 3
    assert np.mean([r["loss"] for r in records[-n:]]) < 0.5 * np.mean([r["loss"] for r in records[:n]])
    assert report["val_transitions"] == 16 and report["auc"] == 1.0 and report["accuracy"] >= 0.75
    assert report["mean_reward"]["expert"] > 0 > report["mean_reward"]["policy"]
    assert (tmp_path / "prm/model.safetensors").is_file()


def test_steered_prompt_adds_the_hint_after_the_system_instructions(tiny_model):
    from transformers import AutoTokenizer

    from agent import AgentState

    prompt = render_prompt(AutoTokenizer.from_pretrained(tiny_model), AgentState("task", "obs", ["look"]), 8)
    steered = steer_prompt(prompt, "Explore.")
    assert steered.replace(f"{SYSTEM_PROMPT}\nExplore.", SYSTEM_PROMPT) == prompt and steered != prompt
    with pytest.raises(ValueError, match="system instructions"):
        steer_prompt("no system prompt here", "Explore.")


class RecordingPolicy:
    def __init__(self):
        self.prompts: list[list[int]] = []

    def generate(self, prompts, params):
        self.prompts += prompts
        return ray.put(GenerateResult([[Generation(t, ids_of(t), [], "stop") for t in ("ACTION: a", "ACTION: b")]],
                                      0))


class LastTokenPRM:
    def __init__(self):
        self.prompts: list[list[int]] = []

    def score(self, prompt_ids, responses, session=None):
        self.prompts.append(prompt_ids)
        return ray.put(ScoreResult([float(r[-1] == ord("b")) for r in responses], 0))


def test_steered_exploration_samples_under_the_hint_and_learns_under_the_plain_prompt(ray_local, tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\ns<|im_end|>\n"
    state = tokenizer.encode(text)
    policy, prm = RecordingPolicy(), LastTokenPRM()
    dpo = {"max_policy_lag": 0, "push_every": 1, "temperature": 0.7, "max_new_tokens": 8,
           "samples_per_state": 2, "max_seq_len": 1024, "exploration_prompt": "Explore."}
    contexts = PairSampler(policy, prm, lambda step: [[state]], dpo, seed=0, total_steps=1,
                           tokenizer=tokenizer).pairs(1)
    pair = contexts[0].pairs[0]
    assert policy.prompts == [tokenizer.encode(steer_prompt(text, "Explore."))]
    assert prm.prompts == [state] and pair.state == state and pair.chosen == ids_of("ACTION: b")


def test_reset_starts_the_episode_along_the_experts_trajectory(tiny_model, ood_games):
    game = ood_games[0]
    prompt = OmegaConf.to_container(small_cfg().prompt)
    expert = asyncio.run(RolloutWorker(0, 1, "expert", tiny_model, max_steps=2, prompt=prompt,
                                       policy=None).play(EpisodeTask(game, 0, seed=1)))
    worker = RolloutWorker(0, 1, "random", tiny_model, max_steps=4, prompt=prompt, policy=None)
    steps = asyncio.run(worker.play(EpisodeTask(game, 0, seed=1, reset_actions=tuple(s.action for s in expert))))
    assert [s.step for s in steps] == [2, 3]  # the step limit counts the reset's steps too
    # The policy's first state is the one the expert reached: its turns are the conversation so far.
    assert all(f"ACTION: {s.action}<|im_end|>\n<|im_start|>user\n{s.observation}<|im_end|>" in steps[0].prompt
               for s in expert)
    assert steps[0].context_start and steps[0].prompt.startswith(expert[0].prompt)
    assert all(s.policy_version == -1 for s in steps)


def test_reset_distribution_is_seeded_and_stays_inside_the_demonstration():
    from rollout_workers import reset_steps

    demonstrations = {"g/0": [f"c{i}" for i in range(10)], "g/1": ["c0"]}

    def starts(fraction: float, game: str, episodes: int, max_steps: int = 50) -> list[int]:
        return [reset_steps(0, fraction, max_steps, game, e, demonstrations) for e in range(episodes)]

    assert starts(0.0, "g/0", 20) == [0] * 20
    on = starts(1.0, "g/0", 50)
    assert all(1 <= k <= 9 for k in on) and len(set(on)) > 3
    assert on == starts(1.0, "g/0", 50)
    assert starts(1.0, "g/1", 1) == [0]  # too short to reset
    assert starts(1.0, "g/2", 1) == [0]  # no demonstration
    assert set(starts(1.0, "g/0", 30, max_steps=3)) == {1, 2}  # the policy still gets a step
    assert 5 < sum(k > 0 for k in starts(0.5, "g/0", 40)) < 35