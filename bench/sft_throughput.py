"""SFT throughput: learners, precisions and the policy's state, same model, same demonstrations.

    python -m bench.sft_throughput [--games 8] [--epochs 1] [--workers 2] [--max-steps N]
                                   [--learners deepspeed-zero2 ddp deepspeed-zero1 ...]
                                   [--precisions float32 bfloat16 autocast_bf16]
                                   [--states episode window] [--set KEY=VALUE ...]

The expert's demonstrations on `--games` train games (from the demonstration store) train
the embedded SmolLM2-135M with each learner setup, as Ray Train jobs of `--workers` CPU
workers (`learner.*` and `sft.*` at their defaults otherwise), in each of `--precisions`
(`learner.dtype` float32 or bfloat16, DeepSpeed's bf16 mode; autocast_bf16: float32
weights, bfloat16 matrix products, `learner.autocast_bf16`) and `--states` (`prompt.state`:
one sequence per episode, or one example per step of a windowed state), with `--set`
overrides on top.
For each: the tokens one epoch processes, wall time of the whole job (start-up, steps,
final checkpoint and export), the steps' mean throughput in tokens/s and the seconds an
epoch takes at that rate, first and last loss, and the peak resident memory of the largest
worker. Printed and saved as JSON in bench/results/sft_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray  # noqa: E402

from bench import machine  # noqa: E402
from configs import REPO_ROOT, load_config  # noqa: E402
from agent.episode import ChatFormat  # noqa: E402
from rollout_workers.demonstrations import collect_demos  # noqa: E402
from learners import episode_sequences, train_sft  # noqa: E402
from policy_server import resolve_model  # noqa: E402


LEARNERS = {f"deepspeed-zero{stage}": ["learner.backend=deepspeed", f"learner.zero_stage={stage}"]
            for stage in (0, 1, 2, 3)} | {"ddp": ["learner.backend=ddp"]}
PRECISIONS = {"float32": [], "bfloat16": ["learner.dtype=bfloat16"], "autocast_bf16": ["learner.autocast_bf16=true"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--learners", nargs="+", default=["deepspeed-zero2", "ddp"], choices=list(LEARNERS))
    parser.add_argument("--precisions", nargs="+", default=["float32"], choices=list(PRECISIONS))
    parser.add_argument("--states", nargs="+", default=["episode"], choices=["episode", "window"])
    parser.add_argument("--max-steps", type=int, default=None, help="stop each job after this many steps")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every job, e.g. learner.malloc_mmap_threshold_kb=null")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench/results/sft_throughput.json"))
    args = parser.parse_args()
    if "ddp" in args.learners and "bfloat16" in args.precisions:
        parser.error("ddp has no bfloat16 weights: drop ddp or the bfloat16 precision")

    ray.init(address="local", num_cpus=max(args.workers, os.cpu_count() or 1), include_dashboard=True,
             dashboard_host="127.0.0.1", log_to_driver=True, object_store_memory=2**30)
    demos_run = REPO_ROOT / "bench/results/.sft_demos" / f"train-{args.games}"
    base = [f"demos.num_games={args.games}", f"run_dir={demos_run}", f"learner.num_workers={args.workers}",
            f"sft.epochs={args.epochs}", "sft.checkpoint_every=1000000", f"sft.max_steps={args.max_steps or 'null'}",
            "env.max_steps=50"]
    demos_run.mkdir(parents=True, exist_ok=True)
    collect_demos(load_config(["mode=demos", *base]), demos_run)  # from the store: plays only what it lacks
    results = {"machine": machine(torch_threads=1), "model": "smollm2-135m-instruct", "games": args.games,
               "workers": args.workers, "overrides": args.set, "runs": []}
    for name, precision, state in ((n, p, s) for n in args.learners for p in args.precisions for s in args.states):
        cfg = load_config(["mode=sft", *base, *LEARNERS[name], *PRECISIONS[precision], f"prompt.state={state}",
                           *args.set])
        epoch_tokens = sum(len(e.input_ids) for e in sequences(cfg, demos_run / "demos.parquet"))
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            train_sft(cfg, demos_run / "demos.parquet", resolve_model(cfg.policy.model), Path(tmp))
            wall = time.perf_counter() - start
            steps = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        rate = statistics.mean(s["tokens_per_s"] for s in steps[1:] or steps)  # the first step warms up
        results["runs"].append({"learner": name, "precision": precision, "state": state, "steps": len(steps),
                                "batch_size": cfg.sft.batch_size, "micro_batch_size": cfg.sft.micro_batch_size,
                                "epoch_tokens": epoch_tokens, "epoch_s_at_rate": round(epoch_tokens / rate, 1),
                                "wall_s": round(wall, 1), "tokens_per_s": round(rate, 1),
                                "loss_first": round(steps[0]["loss"], 4), "loss_last": round(steps[-1]["loss"], 4),
                                "peak_rss_gb": round(steps[-1]["peak_rss_gb"], 2)})
        print(results["runs"][-1], flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2))  # written as each learner completes
    print(f"\n{'learner':<16} {'precision':<13} {'state':<8} {'epoch tokens':>12} {'epoch s':>8} {'steps':>5} "
          f"{'wall s':>8} {'tokens/s':>9} {'loss first':>11} {'loss last':>10} {'peak RSS GB':>11}")
    for r in results["runs"]:
        print(f"{r['learner']:<16} {r['precision']:<13} {r['state']:<8} {r['epoch_tokens']:>12} "
              f"{r['epoch_s_at_rate']:>8.0f} {r['steps']:>5} {r['wall_s']:>8.1f} {r['tokens_per_s']:>9.1f} "
              f"{r['loss_first']:>11.4f} {r['loss_last']:>10.4f} {r['peak_rss_gb']:>11.2f}")
    print(f"saved {args.out}")
    ray.shutdown()


def sequences(cfg, demos: Path) -> list:
    """The sequences SFT trains on under this config (one epoch)."""
    import pyarrow.parquet as pq
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    chat = ChatFormat(AutoTokenizer.from_pretrained(resolve_model(cfg.policy.model)))
    return episode_sequences(pq.read_table(demos), chat, OmegaConf.to_container(cfg.prompt),
                             cfg.policy.max_new_tokens)[0]


if __name__ == "__main__":
    main()
