"""Step records: the one schema every stage reads and writes, stored as Parquet shards.

One row per environment step. A run keeps one shard per finished episode under
`<run_dir>/episodes/`, written atomically as the episode completes, so a crash loses only
the episodes in flight and a re-run skips the shards that exist.

The token ids are the episode as the policy saw and wrote it (`agent.episode`): between two
context starts, the concatenation of every step's `prompt_ids` and `response_ids` is the
sequence the policy server held, and a step's full prompt is that concatenation up to its
`prompt_ids`. The text columns are for reading and for stages that read text.

| column               | meaning                                                            |
|----------------------|--------------------------------------------------------------------|
| game_id              | "<task folder>/<trial folder>" of the ALFWorld game                |
| task_type            | pick, look, clean, heat, cool or pick_two                          |
| episode_id           | "<game_id>#<episode index>", unique within a run                   |
| step                 | 0, 1, ...; an episode reset to expert step k starts at k           |
| task                 | the game's task sentence                                           |
| room                 | the game's first observation (the room description)                |
| admissible_commands  | the commands the game accepted at this step's state                |
| prompt               | the full prompt the policy saw (chat template applied), as text    |
| prompt_ids           | the ids fed to the policy before this response that extend what it |
|                      | held: the whole prompt when `context_start`                        |
| context_start        | this step's prompt starts a new token sequence (the first step, a   |
|                      | restart by the context rule, every step of prompt.state=window)    |
| context_rule         | the context rule restarted the conversation before this step       |
| response             | the policy's text (the expert's is "ACTION: <command>")            |
| response_ids         | the response's ids as generated (ending in the end-of-turn token   |
|                      | when it stopped by itself; the expert's: encoded, then that token) |
| action               | the command sent to the game (parsed, else the first line)         |
| valid                | the response parsed and its command was admissible                 |
| observation          | what the game answered to the action                               |
| reward               | 1.0 on the step that wins the game, else 0.0                        |
| done                 | the episode ended here (won, or the step limit)                    |
| won                  | the game was won at this step (only ever on the last step)         |
| policy_version       | weights version that wrote the response; -1 for expert and random  |
| worker_id            | the rollout worker that played the episode                         |
| act_seconds          | how long the agent took to answer (the policy server's reply, and  |
|                      | the PRM's with Best-of-N)                                          |
| candidates           | distinct actions the PRM chose among (Best-of-N); 1 without a PRM  |
| prm_score            | the PRM's Q of the played response; null without a PRM or a choice |
| candidate_actions    | Best-of-N: the distinct commands of the N samples, in sample order; |
|                      | null without a PRM                                                 |
| candidate_samples    | Best-of-N: how many of the N samples sent each candidate           |
| candidate_scores     | Best-of-N: the PRM's Q of each candidate; null without a choice    |

Shards written before a column existed read it as null.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    ("game_id", pa.string()), ("task_type", pa.string()), ("episode_id", pa.string()), ("step", pa.int32()),
    ("task", pa.string()), ("room", pa.string()), ("admissible_commands", pa.list_(pa.string())),
    ("prompt", pa.string()), ("prompt_ids", pa.list_(pa.int32())), ("context_start", pa.bool_()),
    ("context_rule", pa.bool_()),
    ("response", pa.string()), ("response_ids", pa.list_(pa.int32())), ("action", pa.string()), ("valid", pa.bool_()),
    ("observation", pa.string()), ("reward", pa.float32()), ("done", pa.bool_()), ("won", pa.bool_()),
    ("policy_version", pa.int32()), ("worker_id", pa.int32()), ("act_seconds", pa.float32()),
    ("candidates", pa.int32()),
    ("prm_score", pa.float32()),
    ("candidate_actions", pa.list_(pa.string())), ("candidate_samples", pa.list_(pa.int32())),
    ("candidate_scores", pa.list_(pa.float32())),
])


@dataclass
class StepRecord:
    game_id: str
    task_type: str
    episode_id: str
    step: int
    task: str
    room: str
    admissible_commands: list[str]
    prompt: str
    prompt_ids: list[int]
    context_start: bool
    context_rule: bool
    response: str
    response_ids: list[int]
    action: str
    valid: bool
    observation: str
    reward: float
    done: bool
    won: bool
    policy_version: int
    worker_id: int
    act_seconds: float = 0.0
    candidates: int = 1
    prm_score: Optional[float] = None
    candidate_actions: Optional[list[str]] = None
    candidate_samples: Optional[list[int]] = None
    candidate_scores: Optional[list[float]] = None


assert [f.name for f in fields(StepRecord)] == SCHEMA.names, "StepRecord and SCHEMA must list the same columns"


def shard_path(episodes_dir: Path, episode_id: str) -> Path:
    return episodes_dir / (episode_id.replace("/", "__").replace("#", "__ep") + ".parquet")


def write_episode(episodes_dir: Path, steps: list[StepRecord]) -> Path:
    """Write one finished episode as a shard (temp file + rename: never a half-written shard)."""
    path = shard_path(episodes_dir, steps[0].episode_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    pq.write_table(pa.Table.from_pylist([asdict(s) for s in steps], schema=SCHEMA), tmp)
    tmp.rename(path)
    return path


def episodes_in_order(steps: pa.Table) -> list[list[dict]]:
    """The step records as episodes (by id), each in step order."""
    episodes: dict[str, list[dict]] = defaultdict(list)
    for row in steps.to_pylist():
        episodes[row["episode_id"]].append(row)
    return [sorted(episodes[e], key=lambda r: r["step"]) for e in sorted(episodes)]


def read_steps(episodes_dir: Path, episode_ids: list[str] | None = None) -> pa.Table:
    """The step records of the given episodes (default: all in the folder), by episode and step."""
    if episode_ids is None:
        paths = sorted(Path(episodes_dir).glob("*.parquet"))
    else:
        paths = [p for p in sorted(shard_path(episodes_dir, e) for e in set(episode_ids)) if p.exists()]
    if not paths:
        return SCHEMA.empty_table()
    table = pa.concat_tables([pq.read_table(p, schema=SCHEMA) for p in paths])
    return table.sort_by([("episode_id", "ascending"), ("step", "ascending")])
