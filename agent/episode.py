"""The policy's state as token ids: the whole episode as one conversation, or a window of it.

`prompt.state=episode` (the paper's state: the task, the whole history, the observation):

    system: instructions | user: task + room description | assistant: response | user: observation | ...

The context only ever grows by appending: each step's prompt ids are the previous prompt's
ids + the response ids the policy generated + the ids of the new user turn. The policy
server's prefix cache then computes only a step's new tokens, and the step records keep the
very ids the policy saw and wrote. (SFT builds its sequences with this same code; the PRM,
DPO and InversePRM still read the prompt's text and encode it again.)

The context rule: when the next prompt plus a response of `reserve` tokens would pass
`max_tokens`, the conversation restarts from a new first user turn, which keeps the task,
the room description and the places visited so far ("go to" targets), followed by the most
recent turns, copied id for id, that fit in half the budget. A restart is recorded on the
step whose prompt it made (`context_rule`, with `context_start`) and counted in reports.

`prompt.state=window` is the earlier design, kept to compare against: one user message with
the task, the last `history_turns` turns, the observation and the admissible commands,
rendered and encoded anew each step (`agent.prompt`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from agent.prompt import CHAT_DATE, SYSTEM_PROMPT, AgentState, render_prompt

_SENTINEL = "\x00agentprm-turn\x00"


class ChatFormat:
    """The model's chat template cut into the pieces an extending conversation needs: the
    first prompt (system + first user turn + assistant header), the end-of-turn token that
    closes a response, and the text around a later user turn's content."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.end_of_turn = tokenizer.eos_token
        self.end_of_turn_id = tokenizer.eos_token_id
        if self.end_of_turn is None or self.end_of_turn_id is None:
            raise ValueError("the tokenizer has no end-of-turn (eos) token to close a response with")
        rendered = self._render([("user", "U"), ("assistant", "A"), ("user", _SENTINEL)])
        after_response = rendered[rendered.rindex("A" + self.end_of_turn):][1:]
        if not after_response.startswith(self.end_of_turn):
            raise ValueError(f"the chat template does not close an assistant turn with {self.end_of_turn!r}: "
                             "prompt.state=episode cannot extend its conversations")
        self.user_open, self.user_close = after_response[len(self.end_of_turn):].split(_SENTINEL)

    def _render(self, turns: list[tuple[str, str]]) -> str:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}] + [{"role": r, "content": c} for r, c in turns]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  date_string=CHAT_DATE)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def first_prompt(self, content: str) -> list[int]:
        """System instructions, the first user turn, the assistant header."""
        return self.encode(self._render([("user", content)]))

    def user_turn(self, content: str, response_ended: bool) -> list[int]:
        """What follows a response: its end-of-turn token if the policy did not write one (cut
        off at the token limit), then a user turn and the next assistant header."""
        closing = [] if response_ended else [self.end_of_turn_id]
        return closing + self.encode(self.user_open + content + self.user_close)

    def response(self, text: str) -> list[int]:
        """A response written by someone other than the policy (the expert), closed as the
        policy closes its own: with the end-of-turn token."""
        return self.encode(text) + [self.end_of_turn_id]


def first_user_turn(task: str, room: str, admissible: list[str] | None) -> str:
    return f"Your task is to: {task}\n\n{room}" + admissible_line(admissible)


def admissible_line(admissible: list[str] | None) -> str:
    return "" if admissible is None else "\n\nAdmissible commands: " + ", ".join(admissible)


def visited_places(actions: list[str]) -> list[str]:
    """The receptacles the agent went to, in the order of its first visit."""
    places: dict[str, None] = {}
    for action in actions:
        if action.startswith("go to "):
            places.setdefault(action[len("go to "):], None)
    return list(places)


@dataclass
class StepInput:
    """What the policy is fed before one response: `new_ids` extend the context it had (the
    whole prompt when `reset`), `prompt_ids` is that whole prompt; `rule` says that the
    context rule restarted the conversation since the last input."""
    prompt_ids: list[int]
    new_ids: list[int]
    reset: bool
    rule: bool = False


@dataclass
class EpisodeContext:
    """The growing token sequence of one episode (`prompt.state=episode`)."""

    chat: ChatFormat
    task: str
    room: str
    admissible: list[str]
    max_tokens: int  # the model's context (prompt.max_context_tokens)
    reserve: int  # tokens kept free for the response (policy.max_new_tokens)
    show_admissible: bool = False  # each user turn lists the admissible commands
    ids: list[int] = field(default_factory=list)  # the context now: a prompt ending with the assistant header
    turns: list[list[int]] = field(default_factory=list)  # each later (response + user turn), id for id
    actions: list[str] = field(default_factory=list)
    resets: int = 0
    _pending: list[int] = field(default_factory=list)  # ids the policy has not been fed yet
    _fed: bool = False  # the policy was fed the context since the last turn (it wrote the response)
    _restarted: bool = False  # the context rule fired since the last input

    def __post_init__(self):
        self.ids = self._first_prompt("")
        self._pending = list(self.ids)
        if len(self.ids) + self.reserve > self.max_tokens:
            raise ValueError(f"the first prompt ({len(self.ids)} tokens) and a response ({self.reserve}) do not fit "
                             f"in prompt.max_context_tokens={self.max_tokens}")

    def _first_prompt(self, note: str) -> list[int]:
        return self.chat.first_prompt(first_user_turn(self.task, self.room, self.admissible if self.show_admissible
                                                      else None) + note)

    def next_input(self) -> StepInput:
        """The prompt for the coming response, and which of its ids are new to the policy."""
        new, self._pending, self._fed = self._pending, [], True
        rule, self._restarted = self._restarted, False
        return StepInput(self.ids, new, reset=len(new) == len(self.ids), rule=rule)

    def advance(self, response_ids: list[int], action: str, observation: str, admissible: list[str]) -> None:
        """`response_ids` were written (by the policy, as generated: ending in the end-of-turn
        token if it stopped by itself; or by the expert, along the reset distribution), `action`
        went to the game, which answered `observation`."""
        ended = bool(response_ids) and response_ids[-1] == self.chat.end_of_turn_id
        user = self.chat.user_turn(observation + admissible_line(admissible if self.show_admissible else None),
                                   ended)
        self.actions.append(action)
        self.admissible = admissible
        turn = list(response_ids) + user
        self.turns.append(turn)
        if len(self.ids) + len(turn) + self.reserve <= self.max_tokens:
            self.ids = self.ids + turn
            self._pending += user if self._fed else turn  # a response the policy did not write is new to it
            self._fed = False
            return
        self._restart()

    def _restart(self) -> None:
        """The context rule: a new first turn with the task, the room and the places visited,
        then the latest turns, id for id, within half the budget (each turn is a response and
        the user turn after it, so the result ends with the assistant header again)."""
        self.resets += 1
        self._restarted = True
        places = ", ".join(visited_places(self.actions)) or "none"
        head = self._first_prompt(f"\n\n(Earlier turns are not shown. Places visited so far: {places}.)")
        last = self.turns[-1]  # the latest response and observation: always kept
        budget, kept = (self.max_tokens - self.reserve) // 2 - len(head) - len(last), []
        for turn in reversed(self.turns[:-1]):
            if len(turn) > budget:
                break
            kept.insert(0, turn)
            budget -= len(turn)
        self.ids = head + [i for turn in kept for i in turn] + last
        if len(self.ids) + self.reserve > self.max_tokens:
            raise ValueError(f"the context rule cannot fit the task, the room and the latest turn ({len(self.ids)} "
                             f"tokens) and a response ({self.reserve}) in {self.max_tokens} tokens")
        self._pending, self._fed = list(self.ids), False


@dataclass
class WindowContext:
    """`prompt.state=window`: each step's prompt rendered and encoded anew (the earlier design)."""

    tokenizer: object
    state: AgentState
    history_turns: int

    def next_input(self) -> StepInput:
        ids = self.tokenizer.encode(render_prompt(self.tokenizer, self.state, self.history_turns),
                                    add_special_tokens=False)
        return StepInput(ids, ids, reset=True)

    def advance(self, response_ids: list[int], action: str, observation: str, admissible: list[str]) -> None:
        self.state.advance(action, observation, admissible)

    @property
    def resets(self) -> int:
        return 0  # a window is not a restart of anything: every prompt is new by design


def new_context(chat: ChatFormat, prompt: dict, task: str, room: str, admissible: list[str],
                max_new_tokens: int) -> EpisodeContext | WindowContext:
    """The policy's state at an episode's start, as `prompt.state` (the config's prompt
    section) builds it; responses of up to `max_new_tokens` tokens are kept room for."""
    if prompt["state"] == "window":
        return WindowContext(chat.tokenizer, AgentState(task, room, admissible), prompt["history_turns"])
    return EpisodeContext(chat, task, room, admissible, prompt["max_context_tokens"], max_new_tokens,
                          prompt["admissible_commands"])


def replay(chat: ChatFormat, prompt: dict, rows: list[dict], max_new_tokens: int
           ) -> tuple[list[tuple[StepInput, list[int]]], EpisodeContext | WindowContext]:
    """An episode's steps (step records' text: task, room, admissible_commands, response,
    action, observation; in step order from step 0) as the policy would have held them
    under `prompt`: each step's input and its response ids (another's response, encoded
    and closed with the end-of-turn token). Also returns the context, for its restarts."""
    if rows[0]["step"] != 0:
        raise ValueError(f"episode {rows[0].get('episode_id')} starts at step {rows[0]['step']}: only whole "
                         "episodes can be rebuilt from their text")
    context = new_context(chat, prompt, rows[0]["task"], rows[0]["room"], rows[0]["admissible_commands"],
                          max_new_tokens)
    steps = []
    for i, row in enumerate(rows):
        fed = context.next_input()
        response = chat.response(row["response"])
        steps.append((fed, response))
        if i + 1 < len(rows):
            context.advance(response, row["action"], row["observation"], rows[i + 1]["admissible_commands"])
    return steps, context
