"""Prompt rendering and action parsing."""
import pytest
from transformers import AutoTokenizer

from agent import (CHAT_DATE, AgentState, Turn, command_to_send, format_response, parse_action, render_messages,
                   render_prompt)
from envs import AlfworldEnv


def test_every_admissible_command_round_trips(ood_games):
    env = AlfworldEnv()
    obs = env.reset(ood_games[0])
    obs = env.step("go to desk 1")
    env.close()
    assert len(obs.admissible_commands) > 5
    for command in obs.admissible_commands:
        assert parse_action(format_response(command)) == command
        assert parse_action(format_response(command, reason="it may be there.")) == command


@pytest.mark.parametrize("response,expected", [
    ("ACTION: go to desk 1", "go to desk 1"),
    ("REASON: look there first.\nACTION:   Go  to Desk 1.  ", "go to desk 1"),
    ("action: take mug 1 from desk 2\nACTION: look", "take mug 1 from desk 2"),  # the first ACTION line counts
    ("ACTION: `open drawer 2`", "open drawer 2"),
    ("I think I should go to desk 1", None),  # no ACTION line
    ("ACTION:", None),
    ("ACTION:   \n", None),
    ("", None),
    ("REASON: ACTION: go to desk 1", None),  # ACTION must start its own line
])
def test_parse_action(response, expected):
    assert parse_action(response) == expected


def test_render_keeps_recent_history_and_uses_chat_template(tiny_model):
    history = [Turn(f"go to shelf {i}", f"You arrive at shelf {i}.") for i in range(1, 6)]
    state = AgentState("put a mug in the sink.", "You arrive at shelf 5.", ["go to sink 1", "look"], history)
    user = render_messages(state, history_turns=2)[1]["content"]
    assert user.startswith("Your task is to: put a mug in the sink.")
    assert "3 earlier turns omitted" in user and "> go to shelf 4" in user and "> go to shelf 3" not in user
    assert user.endswith("Admissible commands: go to sink 1, look")
    assert "History" not in render_messages(state, history_turns=0)[1]["content"]
    prompt = render_prompt(AutoTokenizer.from_pretrained(tiny_model), state, history_turns=2)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert user in prompt


def test_the_history_window_drops_its_oldest_half_so_prompts_extend_each_other():
    shown, extends = [], []
    state = AgentState("put a mug in the sink.", "You are in a room.", ["look"])
    previous = render_messages(state, history_turns=8)[1]["content"]
    for i in range(1, 30):
        state.advance(f"go to shelf {i}", f"You arrive at shelf {i}.", ["look"])
        user = render_messages(state, history_turns=8)[1]["content"]
        shown.append(user.count("\n> "))
        extends.append(user.startswith(previous[:previous.index("\n\nCurrent observation")]))
        previous = user
    assert shown[:8] == list(range(1, 9)) and min(shown[8:]) == 5 and max(shown[8:]) == 8
    assert "24 earlier turns omitted" in user and "> go to shelf 25" in user and "> go to shelf 24" not in user
    # the window moved at turns 9, 13, 17, 21, 25 and 29; all the others extend the last one's history
    assert [i + 1 for i, e in enumerate(extends) if not e] == [9, 13, 17, 21, 25, 29]


def test_a_chat_template_that_prints_todays_date_gets_a_fixed_one(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = (  # as Llama 3.2's: today's date unless the caller passes one
        "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
        "Today Date: {{ date_string }}\n{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    prompt = render_prompt(tokenizer, AgentState("put a mug in the sink.", "You are in a room.", ["look"]), 0)
    assert prompt.startswith(f"Today Date: {CHAT_DATE}\n")


@pytest.mark.parametrize("response,sent", [
    ("REASON: the desk.\nACTION: go to desk 1", "go to desk 1"),
    ("I will go to the desk.\nThen look around.", "I will go to the desk."),  # invalid: the first line goes
    ("  \n", ""),
])
def test_command_to_send(response, sent):
    assert command_to_send(response) == sent
