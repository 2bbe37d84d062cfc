"""Success rate and friends, computed from step records."""
from __future__ import annotations

from collections import defaultdict

import pyarrow as pa

from envs import TASK_TYPES


def summarize(steps: pa.Table) -> dict:
    """Success overall and per task type, mean steps, invalid-action rate, the share of steps
    that repeat an earlier step of their episode (the same command, the same answer: loops),
    how often the context rule restarted an episode's conversation (agent.episode), and the
    episodes won per game (`reports.paired` compares two evaluations game by game)."""
    episodes: dict[str, dict] = {}
    columns = ["game_id", "episode_id", "task_type", "step", "action", "observation", "valid", "won", "context_rule"]
    for row in steps.select(columns).to_pylist():
        ep = episodes.setdefault(row["episode_id"], {"game_id": row["game_id"], "task_type": row["task_type"],
                                                     "steps": 0, "invalid": 0, "won": False, "restarts": 0,
                                                     "seen": set(), "repeats": 0})
        ep["steps"] += 1
        ep["repeats"] += (row["action"], row["observation"]) in ep["seen"]
        ep["seen"].add((row["action"], row["observation"]))
        ep["invalid"] += not row["valid"]
        ep["won"] |= row["won"]
        ep["restarts"] += bool(row["context_rule"])
    by_type: dict[str, list[bool]] = defaultdict(list)
    by_game: dict[str, list[bool]] = defaultdict(list)
    for ep in episodes.values():
        by_type[ep["task_type"]].append(ep["won"])
        by_game[ep["game_id"]].append(ep["won"])
    n = len(episodes)
    total_steps = sum(ep["steps"] for ep in episodes.values())
    return {
        "episodes": n,
        "success_rate": sum(ep["won"] for ep in episodes.values()) / n if n else 0.0,
        "per_task_type": {
            t: {"episodes": len(by_type[t]), "success_rate": sum(by_type[t]) / len(by_type[t])}
            for t in TASK_TYPES.values() if by_type[t]
        },
        "mean_steps": total_steps / n if n else 0.0,
        "invalid_action_rate": sum(ep["invalid"] for ep in episodes.values()) / total_steps if total_steps else 0.0,
        "repeated_step_rate": sum(ep["repeats"] for ep in episodes.values()) / total_steps if total_steps else 0.0,
        "context_rule_restarts": sum(ep["restarts"] for ep in episodes.values()),
        "episodes_with_restarts": sum(ep["restarts"] > 0 for ep in episodes.values()),
        "won_per_game": {game: [sum(won), len(won)] for game, won in sorted(by_game.items())},
    }


def format_report(report: dict) -> str:
    """A plain-text table of `summarize`'s output plus the run facts stored beside it."""
    lines = [f"{'task type':<10} {'episodes':>8} {'success':>8}"]
    for t, r in report["per_task_type"].items():
        lines.append(f"{t:<10} {r['episodes']:>8} {r['success_rate']:>8.1%}")
    lines.append(f"{'all':<10} {report['episodes']:>8} {report['success_rate']:>8.1%}")
    facts = {k: report[k] for k in ("split", "games", "max_steps", "seed", "agent", "model") if k in report}
    lines.append(f"mean steps {report['mean_steps']:.1f}, invalid actions {report['invalid_action_rate']:.1%}, "
                 f"repeated steps {report.get('repeated_step_rate', 0):.1%}, "
                 f"context-rule restarts {report.get('context_rule_restarts', 0)}, "
                 + ", ".join(f"{k} {v}" for k, v in facts.items()))
    if "wall_time_s" in report:
        lines.append(f"wall time {report['wall_time_s']:.0f} s")
    return "\n".join(lines)
