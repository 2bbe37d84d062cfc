"""Online DPO on whole episodes: a context's pairs off one encoding against each pair off its
own state, on the same episodes, model and pairs.

    python -m bench.dpo_throughput STEPS [--contexts 4] [--threads 2] [--model POLICY_FOLDER] [--float32]

STEPS holds step records: a folder of episode shards (e.g. <run>/iter_1/critic/rollouts) or a
Parquet file of them (a run's demos.parquet). Each of the first `--contexts` contexts
(`learners.qtargets.context_states`) gets a pair at every state: the step's own response
chosen, another step's rejected. One DPO micro-step each way, as the learner takes it
(the policy's forward and backward, the reference's forward, bf16 autocast unless
`--float32`): every pair of
a context in one row (`context_logprobs` of them all), and every pair in its own row (its
state and two responses). Reports pairs per second, tokens computed per pair, and the
largest difference of the two ways' log-probabilities. In this process, no Ray. Saved as
JSON in bench/results/dpo_throughput.json with the machine, as each way completes.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from bench import machine  # noqa: E402
from configs import REPO_ROOT  # noqa: E402
from learners.dpo import PreferencePair, context_logprobs, dpo_loss  # noqa: E402
from learners.qtargets import context_states, state_ids, state_key  # noqa: E402
from policy_server import resolve_model  # noqa: E402
from rollout_workers.records import episodes_in_order, read_steps  # noqa: E402


def context_pairs(steps: pa.Table, contexts: int, seed: int = 0) -> list[list[PreferencePair]]:
    """A pair at every state of the first `contexts` contexts: the response the step took,
    and one of another step."""
    responses = {}
    for rows in episodes_in_order(steps):
        for row, state in zip(rows, state_ids(rows)):
            responses.setdefault(state_key(state), list(row["response_ids"]))
    pool, rng = list(responses.values()), random.Random(seed)
    table = steps.append_column("split", pa.array(["train"] * steps.num_rows))
    return [[PreferencePair(s, responses[state_key(s)], rng.choice(pool), 1.0, 0.0, 0) for s in context]
            for context in context_states(table, "train")[:contexts]]


def micro_step(policy, reference, groups: list[list[PreferencePair]], bf16: bool) -> torch.Tensor:
    """The mean DPO loss over all the groups' pairs, forward and backward one row (group) at a
    time, as the learner's micro-batches go; the policy's log-probabilities."""
    policy.zero_grad()
    total, out = sum(map(len, groups)), []
    for group in groups:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                ref = context_logprobs(reference, group, "cpu")
            mine = context_logprobs(policy, group, "cpu")
            loss, _ = dpo_loss(mine[:, 0], mine[:, 1], ref[:, 0], ref[:, 1], beta=0.03)
        (loss * len(group) / total).backward()
        out.append(mine.detach().float())
    return torch.cat(out)


def main() -> None:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", type=Path)
    parser.add_argument("--contexts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the policy (speed only)")
    parser.add_argument("--float32", action="store_true", help="no bf16 autocast (the learners' default)")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench/results/dpo_throughput.json"))
    args = parser.parse_args()

    steps = pq.read_table(args.steps) if args.steps.is_file() else read_steps(args.steps)
    contexts = context_pairs(steps, args.contexts)
    if not contexts:
        raise SystemExit(f"dpo_throughput: no step records in {args.steps}")
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pairs = [p for c in contexts for p in c]
    results = {"machine": machine(args.threads), "steps": str(args.steps), "model": args.model,
               "contexts": len(contexts), "pairs": len(pairs), "bf16_autocast": not args.float32, "runs": []}
    ways = (("a context's pairs in one row", contexts, lambda c: max(len(p.state) for p in c)),
            ("each pair in its own row", [[p] for p in pairs], lambda c: len(c[0].state)))
    first = None
    for name, groups, trunk_len in ways:
        start = time.perf_counter()
        logprobs = micro_step(policy, reference, groups, bf16=not args.float32)
        seconds = time.perf_counter() - start
        first = logprobs if first is None else first
        tokens = sum(trunk_len(g) + sum(len(p.chosen) + len(p.rejected) for p in g) for g in groups)
        results["runs"].append({"way": name, "rows": len(groups), "seconds": round(seconds, 1),
                                "pairs_per_s": round(len(pairs) / seconds, 3), "tokens": tokens,
                                "tokens_per_pair": round(tokens / len(pairs), 1),
                                "max_abs_logprob_diff_vs_first": round((logprobs - first).abs().max().item(), 4)})
        print(results["runs"][-1], flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
