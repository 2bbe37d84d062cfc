"""The PRM on whole-episode states: training tokens per epoch and Best-of-N scoring speed,
the episode design against the per-step one, on the same rollouts.

    python -m bench.prm_throughput ROLLOUTS_DIR [--episodes 4] [--steps 20] [--candidates 8]
        [--threads 2] [--dtype bfloat16] [--model PRM_OR_POLICY_FOLDER]

ROLLOUTS_DIR holds a policy's step records (e.g. <run>/iter_1/critic/rollouts). It reports:
- PRM training tokens per epoch over all the rollouts: one pass per episode (Q at every
  turn) against one sequence per step (the state, re-read at every step, and the action);
- Best-of-N scoring: the first `--steps` steps of `--episodes` episodes, replayed in order,
  each step scoring `--candidates` responses (the step's own and others of the rollouts,
  as a Best-of-N step sends), with the state encoded once and its history cached between
  steps (`prm_service.share_prompt`) against every (state, response) a full sequence.
  Pairs per second, forward passes, tokens computed, and the largest score difference.
In this process, no Ray. Saved as JSON in bench/results/prm_throughput.json with the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from bench import machine  # noqa: E402
from configs import REPO_ROOT  # noqa: E402
from learners.qtargets import state_ids  # noqa: E402
from models.prm import load_prm  # noqa: E402
from policy_server import resolve_model  # noqa: E402
from prm_service import PRMScorer, ScoreRequest  # noqa: E402
from rollout_workers.records import episodes_in_order, read_steps  # noqa: E402


def best_of_n_requests(episodes: list[list[dict]], steps: int, candidates: int, seed: int = 0
                       ) -> list[ScoreRequest]:
    """Each step's state with its own response and `candidates` - 1 others of the rollouts."""
    rng = random.Random(seed)
    pool = [list(r["response_ids"]) for rows in episodes for r in rows]
    requests = []
    for rows in episodes:
        for row, state in list(zip(rows, state_ids(rows)))[:steps]:
            requests.append(ScoreRequest(state, [list(row["response_ids"])] + rng.sample(pool, candidates - 1)))
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rollouts", type=Path)
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the PRM's backbone (speed only)")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench/results/prm_throughput.json"))
    args = parser.parse_args()

    episodes = episodes_in_order(read_steps(args.rollouts))
    if not episodes:
        raise SystemExit(f"prm_throughput: no step records in {args.rollouts}")
    per_step = sum(len(s) + len(r["response_ids"]) for rows in episodes for r, s in zip(rows, state_ids(rows)))
    per_episode = sum(len(r["prompt_ids"]) + len(r["response_ids"]) for rows in episodes for r in rows)
    results = {"machine": machine(args.threads), "rollouts": str(args.rollouts), "episodes": len(episodes),
               "steps": sum(map(len, episodes)),
               "training_tokens_per_epoch": {"episode": per_episode, "per_step": per_step,
                                             "ratio": round(per_step / per_episode, 2)},
               "dtype": args.dtype, "runs": []}
    print(f"PRM training tokens per epoch: {per_episode} as episodes, {per_step} one sequence per step "
          f"({per_step / per_episode:.1f}x)", flush=True)

    torch.set_num_threads(args.threads)
    requests = best_of_n_requests(episodes[:args.episodes], args.steps, args.candidates)
    pairs = sum(len(r.responses) for r in requests)
    with tempfile.TemporaryDirectory() as folder:
        model, tokenizer = load_prm(resolve_model(args.model), new_head=True)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        scorers = {share: PRMScorer(folder, device="cpu", dtype=args.dtype, share_prompt=share)
                   for share in (True, False)}
    reference = None
    for share, name in ((True, "state encoded once, history cached"), (False, "full sequence per pair")):
        scorer = scorers[share]
        start = time.perf_counter()
        scores = [q for r in requests for q in scorer.score([r])[0]]  # one Best-of-N step after the other
        seconds = time.perf_counter() - start
        reference = reference or scores
        results["runs"].append({"mode": name, "seconds": round(seconds, 2), "pairs": pairs,
                                "pairs_per_s": round(pairs / seconds, 2), "forward_passes": scorer.forward_passes,
                                "computed_tokens": scorer.computed_tokens,
                                "max_abs_diff_vs_first": round(max(abs(a - b) for a, b in zip(scores, reference)), 5)})
        print(results["runs"][-1], flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2))  # written as each mode completes
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
