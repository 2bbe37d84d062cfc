"""The policy's instructions, the format of its answer, and the windowed state.

`agent.episode` builds the policy's state (the whole episode as one conversation by
default); `prompt.state=window` renders it as one user message (task, recent history,
current observation, admissible commands) here. The model answers
    REASON: <optional short thought>
    ACTION: <command>
SFT targets, the PRM's inputs and DPO pairs all use exactly these strings.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

SYSTEM_PROMPT = (
    "You are an agent in a household text game. Complete the task by sending one command per turn. "
    "Answer in the format:\n"
    "REASON: <one short sentence>\nACTION: <command>"
)
# Chat templates that print a date (Llama 3.2's "Today Date:") get this one, so a state renders
# the same on every day: stored demonstrations, new rollouts and merged Q-targets agree.
CHAT_DATE = "26 Jul 2024"
_ACTION_RE = re.compile(r"^\s*ACTION\s*:\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


@dataclass
class Turn:
    action: str
    observation: str


@dataclass
class AgentState:
    """What the policy sees at one step."""

    task: str
    observation: str
    admissible_commands: list[str]
    history: list[Turn] = field(default_factory=list)  # all turns so far; rendering keeps the recent ones

    def advance(self, action: str, observation: str, admissible_commands: list[str]) -> None:
        """The state after `action` was sent and the game answered."""
        self.history.append(Turn(action, observation))
        self.observation, self.admissible_commands = observation, admissible_commands


def history_window_start(num_turns: int, history_turns: int) -> int:
    """Index of the first turn shown: at most `history_turns` turns, and the window drops its
    oldest half at once rather than one turn per step (between history_turns/2 + 1 and
    history_turns are shown). Between two drops, each prompt of an episode extends the last
    one's history, so the policy server's prefix cache does not compute that history again."""
    if num_turns <= history_turns:
        return 0
    stride = max(1, history_turns // 2)
    return -(-(num_turns - history_turns) // stride) * stride  # the excess, rounded up to a stride


def render_user_message(state: AgentState, history_turns: int) -> str:
    lines = [f"Your task is to: {state.task}"]
    skipped = history_window_start(len(state.history), history_turns)  # all of them for 0
    recent = state.history[skipped:]
    if recent:
        lines.append("")
        lines.append(f"Recent history ({skipped} earlier turns omitted):" if skipped else "History:")
        for turn in recent:
            lines.append(f"> {turn.action}")
            lines.append(turn.observation)
    lines += ["", f"Current observation: {state.observation}", "",
              "Admissible commands: " + ", ".join(state.admissible_commands)]
    return "\n".join(lines)


def render_messages(state: AgentState, history_turns: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": render_user_message(state, history_turns)},
    ]


def render_prompt(tokenizer, state: AgentState, history_turns: int) -> str:
    """The full prompt text, through the model's chat template, ready for generation."""
    return tokenizer.apply_chat_template(
        render_messages(state, history_turns), tokenize=False, add_generation_prompt=True, date_string=CHAT_DATE
    )


def steer_prompt(prompt: str, hint: str) -> str:
    """The prompt with an exploration hint after the system instructions (steered
    exploration: DPO samples under the steered prompt and learns under the plain one)."""
    if SYSTEM_PROMPT not in prompt:
        raise ValueError("steer_prompt: the prompt does not contain the agent's system instructions")
    return prompt.replace(SYSTEM_PROMPT, f"{SYSTEM_PROMPT}\n{hint}", 1)


def format_response(action: str, reason: str | None = None) -> str:
    """A response in the policy's format (the expert's demonstrations are written this way)."""
    return (f"REASON: {reason}\n" if reason else "") + f"ACTION: {action}"


def command_to_send(response: str) -> str:
    """What goes to the game: the parsed command, else the response's first line (a command
    is one line; the game answers "Nothing happens." to anything it does not know)."""
    command = parse_action(response)
    if command is not None:
        return command
    lines = response.strip().splitlines()
    return lines[0].strip() if lines else ""


def parse_action(response: str) -> str | None:
    """The command after the first `ACTION:` line, normalised; None if there is none."""
    match = _ACTION_RE.search(response)
    if not match:
        return None
    command = " ".join(match.group(1).split()).strip("`\"'").rstrip(".").strip().lower()
    return command or None
