"""Episode tasks: which episodes a stage plays, each with its seed and its start.

An episode is a game, an index among that game's episodes, a seed that does not depend on
which worker plays it or when, and the commands of the reset distribution (AgentPRM's
stage 1 starts a share of its rollouts along the game's expert demonstration).
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from envs import Game


@dataclass(frozen=True)
class EpisodeTask:
    game: Game
    episode_index: int  # several episodes of one game are told apart by this
    seed: int
    # Reset distribution: these commands (a prefix of the game's expert demonstration) are
    # played first and not recorded, so the policy starts from a state along that trajectory.
    reset_actions: tuple[str, ...] = ()

    @property
    def episode_id(self) -> str:
        return f"{self.game.game_id}#{self.episode_index}"


def episode_seed(seed: int, game_id: str, episode_index: int) -> int:
    """A per-episode seed that does not depend on which worker plays it or in what order."""
    return zlib.crc32(f"{seed}:{game_id}:{episode_index}".encode())


def episode_tasks(games: list[Game], episodes_per_game: int, seed: int, reset_fraction: float = 0.0,
                  max_steps: int = 0, demonstrations: dict[str, list[str]] | None = None) -> list[EpisodeTask]:
    """`episodes_per_game` episodes of each game, seeded; with `demonstrations`, each starts
    from the reset distribution (`reset_steps`)."""
    demonstrations = demonstrations or {}
    return [EpisodeTask(g, e, episode_seed(seed, g.game_id, e), tuple(demonstrations.get(g.game_id, [])[
        :reset_steps(seed, reset_fraction, max_steps, g.game_id, e, demonstrations)]))
        for g in games for e in range(episodes_per_game)]


def reset_steps(seed: int, reset_fraction: float, max_steps: int, game_id: str, episode_index: int,
                demonstrations: dict[str, list[str]]) -> int:
    """The reset distribution: for a `reset_fraction` share (`critic.reset_fraction`) of the
    episodes of games whose demonstration has L >= 2 steps, its first 1..L-1 commands
    (uniform; fewer than the step limit) are played before the policy takes over; 0 otherwise."""
    end = min(len(demonstrations.get(game_id, ())), max_steps)  # the policy acts at least once
    rng = random.Random(episode_seed(seed + 1, game_id, episode_index))
    if end < 2 or rng.random() >= reset_fraction:
        return 0
    return rng.randrange(1, end)


def demonstrated_commands(demos: Path) -> dict[str, list[str]]:
    """Each game's demonstration (its first, if several) as its list of commands, in order."""
    table = pq.read_table(demos, columns=["game_id", "episode_id", "step", "action"])
    episodes: dict[str, list[str]] = {}
    for row in table.sort_by([("episode_id", "ascending"), ("step", "ascending")]).to_pylist():
        episodes.setdefault(row["episode_id"], []).append(row["action"])
    out: dict[str, list[str]] = {}
    for episode_id in sorted(episodes):
        out.setdefault(episode_id.rsplit("#", 1)[0], episodes[episode_id])
    return out
