"""One ALFWorld text game behind a small interface: reset, step, the expert's next action.

ALFWorld's environment is not thread-safe; each instance loads its own copy of the planner
library, so several instances may live in one process as long as one thread drives them.
"""
from __future__ import annotations

import importlib
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass

from envs.data import Game

_TASK_PREFIX = "Your task is to: "


@dataclass
class Observation:
    text: str  # what the game said after the last command (the room description at reset)
    admissible_commands: list[str]
    done: bool = False  # the game ended (won) or the step limit was reached
    won: bool = False


class AlfworldEnv:
    """Plays one game at a time; `reset(game)` switches games. `with_expert` runs ALFWorld's
    handcoded expert beside the game (for `expert_action`): it plans after every step, and
    raises on some states a policy reaches (an empty `random.choice`), so only the expert
    agent turns it on. The expert breaks ties with `random.choice` on the process's global
    random state, which the other games of a rollout worker share: here it draws from a
    stream of its own, seeded by the game, so its episode of a game is the same every time."""

    def __init__(self, max_steps: int = 50, with_expert: bool = False):
        self.max_steps = max_steps
        self.with_expert = with_expert
        self.task = ""
        self.steps = 0
        self._env = None
        self._state = None
        self._expert_random = random.Random()

    def reset(self, game: Game) -> Observation:
        """Start `game` from its initial state; the task sentence goes to `self.task`."""
        import textworld

        AlfredDemangler, AlfredExpert, AlfredInfos = _alfworld_wrappers()
        self.close()  # a game's planner state cannot be reloaded in place: one env per game
        extras, wrappers = ["gamefile"], [AlfredDemangler(shuffle=False), AlfredInfos]
        if self.with_expert:
            extras.append("expert_plan")
            wrappers.append(AlfredExpert(expert_type="handcoded"))
        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=extras)
        self._env = textworld.start(game.path, infos, wrappers=wrappers)
        self._expert_random.seed(game.game_id)
        with self._expert_draws():
            self._state = self._env.reset()
        self.steps = 0
        intro, _, task = self._state["feedback"].partition(_TASK_PREFIX)
        if not task:
            raise RuntimeError(f"game {game.game_id}: no task sentence in its first observation")
        self.task = task.strip()
        # Drop the "-= Welcome to TextWorld, ALFRED! =-" banner; keep the room description.
        room = intro.split("=-", 1)[-1].strip()
        return Observation(room, self._commands())

    def step(self, command: str) -> Observation:
        """Send `command` (any text: the game answers "Nothing happens." to nonsense)."""
        if self._state is None:
            raise RuntimeError("step() before reset()")
        with self._expert_draws():
            self._state, _, game_over = self._env.step(command)
        self.steps += 1
        won = bool(self._state["won"])
        done = bool(game_over) or won or self.steps >= self.max_steps
        return Observation(self._state["feedback"].strip(), self._commands(), done, won)

    def expert_action(self) -> str:
        """The handcoded expert's next command from the current state."""
        if not self.with_expert:
            raise RuntimeError("expert_action() needs AlfworldEnv(with_expert=True)")
        return self._state["extra.expert_plan"][0]

    @contextmanager
    def _expert_draws(self):
        """The expert plans inside the game's reset and step: its draws come from this game's stream."""
        if not self.with_expert:
            yield
            return
        handcoded_expert = _alfworld("alfworld.agents.expert.handcoded_expert")
        handcoded_expert.random = self._expert_random
        try:
            yield
        finally:
            handcoded_expert.random = random

    def _commands(self) -> list[str]:
        # "help" lists the game's verbs: no use to an agent, and not an action on the world.
        return [c for c in self._state["admissible_commands"] if c != "help"]

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env, self._state = None, None


def _alfworld(module: str):
    """An alfworld module, imported without the side effect of alfworld's import: alfworld
    sets $ALFWORLD_DATA to its own default when unset, which would hide our data resolution."""
    before = os.environ.get("ALFWORLD_DATA")
    imported = importlib.import_module(module)
    if before is None:
        os.environ.pop("ALFWORLD_DATA", None)
    return imported


def _alfworld_wrappers():
    wrappers = _alfworld("alfworld.agents.environment.alfred_tw_env")
    return wrappers.AlfredDemangler, wrappers.AlfredExpert, wrappers.AlfredInfos
