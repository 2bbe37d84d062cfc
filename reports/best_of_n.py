"""What the PRM chose between in a Best-of-N evaluation, from its step records.

    python -m reports.best_of_n EPISODES_DIR [--out choices.json]

Best-of-N beats the policy only if the PRM, at the states where the N samples disagree,
moves the agent away from what the policy would mostly have done and towards what wins.
For the steps where the PRM had a choice (two or more distinct commands) it reports, over
all episodes and for won and lost ones apart:
- how many distinct commands the N samples held (`candidates`);
- how often the PRM played the command most samples sent (the policy's own preference;
  ties count as the majority), and how often one that a single sample sent;
- how often it played a command the game did not accept while an accepted one was among
  the candidates.
Records written before the candidate columns existed are skipped (and counted).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rollout_workers.records import episodes_in_order, read_steps


def choice_stats(steps: list[dict]) -> dict:
    """The shares above over `steps` that held a choice (non-null `candidate_scores`)."""
    chosen = [s for s in steps if s["candidate_scores"] is not None]
    if not chosen:
        return {"steps_with_a_choice": 0}

    def share(flags: list[bool]) -> float:
        return round(sum(flags) / len(flags), 4) if flags else None

    def samples_of(step: dict) -> int:
        return step["candidate_samples"][step["candidate_actions"].index(step["action"])]

    admissible = [set(s["admissible_commands"]) for s in chosen]
    valid_offered = [bool(adm & set(s["candidate_actions"])) for s, adm in zip(chosen, admissible)]
    return {
        "steps_with_a_choice": len(chosen),
        "mean_candidates": round(sum(len(s["candidate_actions"]) for s in chosen) / len(chosen), 2),
        "played_the_majority": share([samples_of(s) == max(s["candidate_samples"]) for s in chosen]),
        "played_a_single_sample": share([samples_of(s) == 1 for s in chosen]),
        "played_invalid_over_a_valid": share([s["action"] not in adm
                                              for s, adm, offered in zip(chosen, admissible, valid_offered)
                                              if offered]),
    }


def best_of_n_choices(episodes_dir: Path) -> dict:
    """`choice_stats` over all episodes, won ones and lost ones."""
    episodes = episodes_in_order(read_steps(episodes_dir))
    recorded = [e for e in episodes if any(s["candidate_actions"] is not None for s in e)]
    won = [e for e in recorded if e[-1]["won"]]
    lost = [e for e in recorded if not e[-1]["won"]]
    return {"episodes": len(episodes), "without_candidate_records": len(episodes) - len(recorded),
            **{name: choice_stats([s for e in group for s in e])
               for name, group in (("all", recorded), ("won", won), ("lost", lost))}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("episodes_dir", type=Path, help="a Best-of-N evaluation's folder of episode shards")
    parser.add_argument("--out", type=Path, help="also write the report here as JSON")
    args = parser.parse_args()
    if not args.episodes_dir.is_dir():
        sys.exit(f"best_of_n: {args.episodes_dir} is not a folder of episode shards")
    report = best_of_n_choices(args.episodes_dir)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
