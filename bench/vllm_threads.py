"""Best-of-N sampling with vLLM on CPU: how many engine threads, on an evaluation's own states.

    .venv/bin/python -m bench.vllm_threads EPISODES_DIR POLICY_FOLDER [--variants auto 1 2]
        [--prompts 8] [--n 16] [--max-tokens 48] [--temperature 0.7] [--repeats 2]

The prompts are states a policy saw in an evaluation (the `prompt_ids` of its step records in
EPISODES_DIR, whole episodes so far), `--prompts` of them spread evenly over its steps. Each
variant starts a fresh engine: `auto` is vLLM's own CPU binding (a thread on every core but
one), a number is that many unbound threads (`policy.torch_threads`). All prompts are
submitted at once, `--n` samples each (as Best-of-N does at every step), best of `--repeats`
with the prefix cache emptied before each, then once more with every state in the prefix
cache (as an episode's history is in it at its next step); figures: generated tokens/s and
states/s. Saved as JSON with the machine in bench/results/vllm_threads.json, after each variant.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow.parquet as pq  # noqa: E402

from bench import machine  # noqa: E402
from configs import REPO_ROOT, load_config  # noqa: E402
from learners.qtargets import state_ids  # noqa: E402
from policy_server import SamplingParams  # noqa: E402
from policy_server.server import make_engine  # noqa: E402


def evaluation_states(folder: Path, count: int) -> list[list[int]]:
    """`count` whole prompts (token ids) spread evenly over the steps of the episodes in `folder`."""
    states = []
    for shard in sorted(folder.glob("*.parquet")):
        rows = sorted(pq.read_table(shard, columns=["step", "prompt_ids", "response_ids", "context_start"]).to_pylist(),
                      key=lambda row: row["step"])
        states += state_ids(rows)
    if len(states) < count:
        raise SystemExit(f"{folder} holds {len(states)} steps, fewer than --prompts {count}")
    return [states[i * len(states) // count] for i in range(count)]


async def measure(variant: str, policy_cfg: dict, model_path: str, prompts: list[list[int]],
                  params: SamplingParams, repeats: int) -> dict:
    if variant == "auto":
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "auto"
    else:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        policy_cfg = {**policy_cfg, "torch_threads": int(variant)}
    engine = make_engine(model_path, "vllm", policy_cfg, seed=0)
    best, outputs = None, None
    for _ in range(repeats):
        await engine.llm.reset_prefix_cache()
        start = time.perf_counter()
        outputs = await engine.generate(prompts, [params] * len(prompts))
        seconds = time.perf_counter() - start
        best = seconds if best is None else min(best, seconds)
    start = time.perf_counter()  # once more, every state in the prefix cache (as an episode's history is)
    await engine.generate(prompts, [params] * len(prompts))
    warm = time.perf_counter() - start
    engine.shutdown()
    new_tokens = sum(len(g.token_ids) for samples in outputs for g in samples)
    return {"variant": variant, "generate_s": round(best, 2), "new_tokens": new_tokens,
            "tokens_per_s": round(new_tokens / best, 1), "states_per_s": round(len(prompts) / best, 3),
            "states_per_s_prefix_cached": round(len(prompts) / warm, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("episodes", type=Path)
    parser.add_argument("policy", help="the policy's Hugging Face folder")
    parser.add_argument("--variants", nargs="+", default=["auto", "1", "2"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(REPO_ROOT / "bench/results/vllm_threads.json"))
    args = parser.parse_args()

    from omegaconf import OmegaConf

    cfg = load_config(["policy.engine=vllm", "policy.vllm.kv_cache_gb=1", f"policy.model={args.policy}"])
    policy_cfg = OmegaConf.to_container(cfg.policy, resolve=True)
    prompts = evaluation_states(args.episodes, args.prompts)
    params = SamplingParams(n=args.n, temperature=args.temperature, max_tokens=args.max_tokens)
    results = {"machine": machine(os.cpu_count()), "policy": args.policy, "episodes": str(args.episodes),
               "n": args.n, "temperature": args.temperature, "max_tokens": args.max_tokens,
               "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1), "runs": []}
    for variant in args.variants:
        results["runs"].append(asyncio.run(measure(variant, policy_cfg, args.policy, prompts, params, args.repeats)))
        print(results["runs"][-1], flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\n{len(prompts)} states of {results['prompt_tokens_mean']} tokens on average, n={args.n}")
    for r in results["runs"]:
        print(f"{r['variant']:>6}: {r['tokens_per_s']:>7.1f} tokens/s {r['states_per_s']:>7.3f} states/s, "
              f"{r['states_per_s_prefix_cached']:>7.3f} prefix cached")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
