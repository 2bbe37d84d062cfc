"""Engine throughput: vLLM vs transformers, same model, same multi-turn ALFWorld prompts.

    .venv/bin/python -m bench.engine_throughput [--games 8] [--max-tokens 48] [--engines hf vllm]
        [--dtypes float32 bfloat16]

The prompts are what the policy sees along the handcoded expert's episodes (steps 0, 3, 6
and 9 of the first `--games` eval_out_of_distribution games: task, history, observation,
admissible commands). For each engine and weight dtype, in this process (no Ray), it measures:
- start-up: from nothing to ready (model load; vLLM also starts its engine process and
  allocates its KV cache);
- generation: all prompts submitted at once, greedy, `--max-tokens` new tokens at most
  (one padded batch for transformers, continuous batching for vLLM), best of `--repeats`,
  vLLM's prefix cache emptied before each; generated tokens/s and prompts/s; for vLLM also
  the same batch once more with every prompt in its prefix cache;
- weight load: replacing the weights in place with another copy of the same model
  (vLLM: through its weight-transfer protocol).
Figures are printed and saved as JSON in bench/results/engine_throughput.json. vLLM is in
.venv after scripts/setup.sh.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from agent import render_prompt  # noqa: E402
from bench import expert_states, machine  # noqa: E402
from configs import REPO_ROOT, load_config  # noqa: E402
from policy_server import SamplingParams, resolve_model  # noqa: E402
from policy_server.server import make_engine  # noqa: E402

async def measure(engine_name: str, dtype: str, cfg, model_path: str, prompts: list[str], max_tokens: int,
                  repeats: int) -> dict:
    policy_cfg = {**cfg_dict(cfg.policy), "engine": engine_name, "dtype": dtype, "max_batch_size": len(prompts)}
    start = time.perf_counter()
    engine = make_engine(model_path, engine_name, policy_cfg, seed=0)
    startup = time.perf_counter() - start
    params = [SamplingParams(max_tokens=max_tokens)] * len(prompts)
    best = None
    for _ in range(repeats):
        if engine.name == "vllm":  # each repeat starts cold: only prefixes shared within the batch are reused
            await engine.llm.reset_prefix_cache()
        start = time.perf_counter()
        outputs = await engine.generate(prompts, params)
        seconds = time.perf_counter() - start
        best = seconds if best is None else min(best, seconds)
    new_tokens = sum(len(g[0].token_ids) for g in outputs)
    warm = None
    if engine.name == "vllm":  # the same prompts again: every prompt is in the prefix cache
        start = time.perf_counter()
        await engine.generate(prompts, params)
        warm = time.perf_counter() - start
    state_dict = AutoModelForCausalLM.from_pretrained(model_path).state_dict()
    start = time.perf_counter()
    await engine.load_weights(state_dict)
    load = time.perf_counter() - start
    engine.shutdown()
    return {"engine": engine_name, "dtype": dtype, "startup_s": round(startup, 2), "prompts": len(prompts),
            "new_tokens": new_tokens, "generate_s": round(best, 2), "tokens_per_s": round(new_tokens / best, 1),
            "prompts_per_s": round(len(prompts) / best, 2), "weight_load_s": round(load, 2),
            "tokens_per_s_prefix_cached": round(new_tokens / warm, 1) if warm else None}


def cfg_dict(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=str(REPO_ROOT / "bench/results/engine_throughput.json"))
    args = parser.parse_args()

    cfg = load_config([f"policy.torch_threads={args.threads}", "policy.device=cpu"])
    torch.set_num_threads(args.threads)
    model_path = resolve_model(cfg.policy.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = [render_prompt(tokenizer, s, cfg.prompt.history_turns) for s in expert_states(cfg, args.games)]
    lengths = [len(tokenizer.encode(p)) for p in prompts]
    results = {"machine": machine(args.threads), "model": cfg.policy.model, "max_tokens": args.max_tokens,
               "prompt_tokens_mean": round(sum(lengths) / len(lengths), 1), "vllm": cfg_dict(cfg.policy.vllm),
               "runs": []}
    for name in args.engines:
        for dtype in args.dtypes:
            results["runs"].append(asyncio.run(measure(name, dtype, cfg, model_path, prompts, args.max_tokens,
                                                       args.repeats)))
            print(results["runs"][-1], flush=True)
            Path(args.out).write_text(json.dumps(results, indent=2))  # written as each run completes
    print(f"\n{len(prompts)} prompts, {results['prompt_tokens_mean']} tokens on average, "
          f"up to {args.max_tokens} new tokens each")
    print(f"{'engine':<7} {'dtype':<9} {'start-up s':>10} {'tokens/s':>9} {'prompts/s':>10} {'weight load s':>14} "
          f"{'tokens/s, prefix cached':>24}")
    for r in results["runs"]:
        print(f"{r['engine']:<7} {r['dtype']:<9} {r['startup_s']:>10.1f} {r['tokens_per_s']:>9.1f} "
              f"{r['prompts_per_s']:>10.2f} "
              f"{r['weight_load_s']:>14.2f} {r['tokens_per_s_prefix_cached'] or '-':>24}")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
