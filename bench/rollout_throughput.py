"""Rollout throughput: environment steps/s and episodes/min, Ray workers vs a plain loop.

    python -m bench.rollout_throughput [--games 8] [--max-steps 10] [--envs-per-worker 4] [--engine vllm]

For each agent, (a) `random` (picks a random admissible command: environment-bound) and
(b) `llm` (the embedded model behind the policy server), the same games are played by
1, 2 and 4 rollout workers with several environments each, and by a plain loop: one
environment, one generate call per step, no Ray (transformers engine; `--no-plain` skips it).
`--engine vllm` puts the vLLM engine behind the policy server (scripts/setup.sh installs it).
Figures are printed and saved as JSON in
bench/results/. Run it on a quiet machine: it measures wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import ray  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from agent import AgentState, command_to_send, format_response, render_prompt  # noqa: E402
from bench import machine  # noqa: E402
from configs import REPO_ROOT, load_config  # noqa: E402
from envs import AlfworldEnv, list_games, resolve_data_root  # noqa: E402
from policy_server import SamplingParams, resolve_model, start_policy_servers  # noqa: E402
from policy_server.hf_engine import HFEngine  # noqa: E402
from rollout_workers import EpisodeTask, read_steps, run_episodes, start_rollout_workers  # noqa: E402


def plain_loop(agent: str, games, cfg, model_path: str) -> dict:
    """The baseline: one environment, one generate call per step, in this process."""
    engine = HFEngine(model_path, device="cpu") if agent == "llm" else None
    tokenizer = engine.tokenizer if engine else __import__("transformers").AutoTokenizer.from_pretrained(model_path)
    params = SamplingParams(temperature=cfg.eval.temperature, max_tokens=cfg.policy.max_new_tokens)
    env, rng, steps = AlfworldEnv(max_steps=cfg.env.max_steps), random.Random(0), 0
    start = time.perf_counter()
    for game in games:
        obs = env.reset(game)
        state = AgentState(env.task, obs.text, obs.admissible_commands)
        while not obs.done:
            prompt = render_prompt(tokenizer, state, cfg.prompt.history_turns)
            if engine:
                response = engine.generate([prompt], params)[0][0].text
            else:
                response = format_response(rng.choice(state.admissible_commands))
            command = command_to_send(response)
            obs = env.step(command)
            steps += 1
            state.advance(command, obs.text, obs.admissible_commands)
    env.close()
    return figures("plain loop", steps, len(games), time.perf_counter() - start, 0.0)


def ray_rollout(agent: str, games, cfg, model_path: str, workers: int) -> dict:
    start = time.perf_counter()
    policy = start_policy_servers(cfg.policy, model_path, cfg.seed) if agent == "llm" else None
    actors = start_rollout_workers(cfg, agent, model_path, policy, cfg.eval.temperature)
    ray.get([a.__ray_ready__.remote() for a in actors], timeout=300)
    if policy:
        policy.wait_ready()
    startup = time.perf_counter() - start
    tasks = [EpisodeTask(g, 0, seed=i) for i, g in enumerate(games)]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run_episodes(actors, cfg.rollout.envs_per_worker, tasks, Path(tmp), desc=f"{agent} x{workers}")
        elapsed = time.perf_counter() - start
        steps = read_steps(Path(tmp)).num_rows
    for a in actors:
        ray.kill(a)
    if policy:
        policy.shutdown()
    return figures(f"{workers} workers x {cfg.rollout.envs_per_worker} envs", steps, len(games), elapsed, startup)


def figures(setup: str, steps: int, episodes: int, seconds: float, startup: float) -> dict:
    return {"setup": setup, "env_steps": steps, "episodes": episodes, "seconds": round(seconds, 2),
            "startup_seconds": round(startup, 2), "env_steps_per_s": round(steps / seconds, 2),
            "episodes_per_min": round(60 * episodes / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--envs-per-worker", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--agents", nargs="+", default=["random", "llm"])
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--model", default=None, help="a Hugging Face folder (default: policy.model)")
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default=str(REPO_ROOT / "bench/results/rollout_throughput.json"))
    args = parser.parse_args()

    base = load_config([f"env.max_steps={args.max_steps}", "policy.torch_threads=2", "rollout.num_cpus=0.25",
                        f"policy.engine={args.engine}"] + ([f"policy.model={args.model}"] if args.model else []))
    games = list_games("eval_out_of_distribution", resolve_data_root(base.data.archive))[:args.games]
    model_path = resolve_model(base.policy.model)
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             object_store_memory=2**30)
    torch.set_num_threads(2)
    results = {"machine": machine(torch_threads=2), "engine": args.engine, "model": base.policy.model, "games": args.games, "max_steps": args.max_steps,
               "max_new_tokens": base.policy.max_new_tokens, "temperature": base.eval.temperature, "runs": {}}
    for agent in args.agents:
        rows = [plain_loop(agent, games, base, model_path)] if args.plain else []
        if rows:
            print(rows[-1], flush=True)
        for n in args.workers:
            cfg = OmegaConf.merge(base, {"rollout": {"num_workers": n, "envs_per_worker": args.envs_per_worker}})
            rows.append(ray_rollout(agent, games, cfg, model_path, n))
            print(rows[-1], flush=True)
        results["runs"][agent] = rows
        Path(args.out).write_text(json.dumps(results, indent=2))  # written as each agent completes
    print(f"\n{'agent':<7} {'setup':<22} {'steps/s':>8} {'episodes/min':>13} {'startup s':>10}")
    for agent, rows in results["runs"].items():
        for r in rows:
            print(f"{agent:<7} {r['setup']:<22} {r['env_steps_per_s']:>8.2f} {r['episodes_per_min']:>13.2f} "
                  f"{r['startup_seconds']:>10.1f}")
    print(f"saved {args.out}")
    ray.shutdown()


if __name__ == "__main__":
    main()
