"""How a PRM ranks the actions at a policy's states: what Best-of-N can gain from it.

    python -m bench.prm_ranking PRM_FOLDER EPISODES_DIR [--steps 300] [--threads 2] [--seed 0]

EPISODES_DIR holds a policy's step records on games whose outcome is known (e.g. π0's
evaluation). For a seeded sample of `--steps` steps, the PRM scores every command the game
accepted there (as the policy writes one: "ACTION: <command>" and its end-of-turn token)
beside the response the policy played, all off one encoding of the state. It reports:
- the AUC of the played action's Q between won and lost episodes (over steps);
- where the played action ranks among the admissible ones (0 = the PRM's favourite), for
  valid and invalid played actions, in won and lost episodes;
- how often the PRM's favourite admissible command is the one the policy played.
Saved as JSON in bench/results/prm_ranking.json with the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from agent import format_response  # noqa: E402
from agent.episode import ChatFormat  # noqa: E402
from bench import machine  # noqa: E402
from configs import REPO_ROOT  # noqa: E402
from learners.prm import weighted_auc  # noqa: E402
from learners.qtargets import state_ids  # noqa: E402
from prm_service import PRMScorer, ScoreRequest  # noqa: E402
from rollout_workers.records import episodes_in_order, read_steps  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prm", type=Path)
    parser.add_argument("episodes", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO_ROOT / "bench/results/prm_ranking.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    scorer = PRMScorer(str(args.prm), device="cpu", dtype="bfloat16")
    chat = ChatFormat(scorer.tokenizer)
    steps = []
    for rows in episodes_in_order(read_steps(args.episodes)):
        won = any(r["won"] for r in rows)
        steps += [(row, state, won) for row, state in zip(rows, state_ids(rows))]
    sample = sorted(random.Random(args.seed).sample(range(len(steps)), min(args.steps, len(steps))))
    records = []
    for i in sample:  # in episode order: the service's cache serves an episode's later states
        row, state, won = steps[i]
        commands = [c for c in row["admissible_commands"] if c != row["action"]]
        responses = [list(row["response_ids"])] + [chat.response(format_response(c)) for c in commands]
        q = scorer.score([ScoreRequest(state, responses)])[0]
        records.append({"won": won, "valid": row["valid"], "q": q[0],
                        "rank": int(sum(x > q[0] for x in q[1:])), "alternatives": len(commands),
                        "favourite_is_played": bool(not commands or q[0] >= max(q[1:]))})
    q = np.array([r["q"] for r in records])
    won = np.array([r["won"] for r in records], dtype=float)
    results = {"machine": machine(args.threads), "prm": str(args.prm), "episodes": str(args.episodes),
               "steps": len(records), "auc_played_q_won_vs_lost": weighted_auc(q, won, 1 - won), "groups": {}}
    for name, keep in (("won, valid", lambda r: r["won"] and r["valid"]), ("lost, valid", lambda r: not r["won"]
                       and r["valid"]), ("won, invalid", lambda r: r["won"] and not r["valid"]),
                       ("lost, invalid", lambda r: not r["won"] and not r["valid"])):
        group = [r for r in records if keep(r)]
        if group:
            results["groups"][name] = {
                "steps": len(group),
                "mean_relative_rank": float(np.mean([r["rank"] / max(1, r["alternatives"]) for r in group])),
                "favourite_is_played": float(np.mean([r["favourite_is_played"] for r in group])),
                "mean_alternatives": float(np.mean([r["alternatives"] for r in group]))}
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
