"""PRM scoring throughput: (state, action) pairs per second, batched vs one at a time, with
and without encoding each shared prompt once.

    python -m bench.prm_throughput [--games 4] [--candidates 8] [--batch-states 8] [--threads 2]
        [--dtypes float32 bfloat16]

The states are what the policy sees along the handcoded expert's episodes (steps 0, 3, 6
and 9 of the first `--games` eval_out_of_distribution games); each state's candidates are
its first `--candidates` admissible commands written as responses ("ACTION: <command>"),
as Best-of-N scores them. The PRM is the embedded model's backbone with a fresh scalar
head (speed does not depend on its training). In this process, no Ray, for each weight
dtype, it times:
- one at a time: one pair per forward pass;
- per state: one request of all a state's candidates (what a Best-of-N step sends), full
  sequences vs the shared prompt;
- batched: `--batch-states` states' requests merged (what the service does with concurrent
  requests), full sequences vs the shared prompt.
Figures are printed and saved as JSON in bench/results/prm_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from agent import format_response, render_prompt  # noqa: E402
from bench import expert_states, machine  # noqa: E402
from configs import REPO_ROOT, load_config  # noqa: E402
from policy_server import resolve_model  # noqa: E402
from prm_service import PRMScorer, ScoreRequest, load_prm  # noqa: E402


def timed(scorer: PRMScorer, batches: list[list[ScoreRequest]]) -> tuple[float, int, list[float]]:
    """Seconds, forward passes and scores for scoring `batches` one after the other."""
    passes = scorer.forward_passes
    start = time.perf_counter()
    scores = [s for batch in batches for request in scorer.score(batch) for s in request]
    return time.perf_counter() - start, scorer.forward_passes - passes, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--batch-states", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=str(REPO_ROOT / "bench/results/prm_throughput.json"))
    args = parser.parse_args()

    cfg = load_config([])
    torch.set_num_threads(args.threads)
    model_path = resolve_model(cfg.policy.model)
    with tempfile.TemporaryDirectory() as folder:
        model, tokenizer = load_prm(model_path, new_head=True)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        scorers = {(dtype, share): PRMScorer(folder, device="cpu", dtype=dtype, share_prompt=share)
                   for dtype in args.dtypes for share in (False, True)}
    requests = [ScoreRequest(render_prompt(tokenizer, s, cfg.prompt.history_turns),
                             [format_response(c) for c in s.admissible_commands[:args.candidates]])
                for s in expert_states(cfg, args.games)]
    pairs = sum(len(r.responses) for r in requests)
    one_at_a_time = [[ScoreRequest(r.prompt, [resp])] for r in requests for resp in r.responses]
    per_state = [[r] for r in requests]
    batched = [requests[i:i + args.batch_states] for i in range(0, len(requests), args.batch_states)]
    modes = [("one pair at a time", False, one_at_a_time), ("per state, full sequences", False, per_state),
             ("per state, shared prompt", True, per_state), ("batched, full sequences", False, batched),
             ("batched, shared prompt", True, batched)]

    prompt_tokens = [len(tokenizer.encode(r.prompt, add_special_tokens=False)) for r in requests]
    results = {"machine": machine(args.threads), "model": cfg.policy.model, "states": len(requests), "pairs": pairs,
               "prompt_tokens_mean": round(sum(prompt_tokens) / len(prompt_tokens), 1),
               "batch_states": args.batch_states, "runs": []}
    reference = None
    for dtype in args.dtypes:
        for name, share, batches in modes:
            scorer = scorers[dtype, share]
            timed(scorer, batches[:1])  # warm-up
            seconds, passes, scores = timed(scorer, batches)
            reference = reference or scores
            results["runs"].append({
                "mode": name, "dtype": dtype, "seconds": round(seconds, 2), "forward_passes": passes,
                "pairs_per_s": round(pairs / seconds, 1),
                "max_abs_diff_vs_first": round(max(abs(a - b) for a, b in zip(scores, reference)), 6)})
            print(results["runs"][-1], flush=True)
            Path(args.out).write_text(json.dumps(results, indent=2))  # written as each mode completes
    print(f"\n{len(requests)} states x up to {args.candidates} candidates = {pairs} pairs, "
          f"prompts of {results['prompt_tokens_mean']} tokens on average")
    print(f"{'mode':<28} {'dtype':<9} {'seconds':>8} {'forward passes':>15} {'pairs/s':>8}")
    for r in results["runs"]:
        print(f"{r['mode']:<28} {r['dtype']:<9} {r['seconds']:>8.2f} {r['forward_passes']:>15} "
              f"{r['pairs_per_s']:>8.1f}")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
