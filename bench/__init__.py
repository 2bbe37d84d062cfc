"""Benchmarks: each prints its figures and saves them, with the machine's, as JSON in bench/results/."""
from __future__ import annotations

import copy
import os
import platform
from pathlib import Path

PROMPT_STEPS = (0, 3, 6, 9)  # the steps of each expert episode whose states the benches use


def machine(torch_threads: int) -> dict:
    """What the figures were measured on."""
    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(), "torch_threads": torch_threads, "python": platform.python_version()}


def cpu_model() -> str | None:
    """The CPU's model name (Linux), so figures from different machines are not compared blind."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def expert_states(cfg, num_games: int) -> list:
    """What the policy sees along the handcoded expert's episodes: the states at steps 0, 3, 6
    and 9 of the first `num_games` eval_out_of_distribution games (multi-turn prompts)."""
    from agent import AgentState
    from envs import AlfworldEnv, list_games, resolve_data_root

    games = list_games("eval_out_of_distribution", resolve_data_root(cfg.data.archive))[:num_games]
    env, states = AlfworldEnv(max_steps=cfg.env.max_steps, with_expert=True), []
    for game in games:
        obs = env.reset(game)
        state = AgentState(env.task, obs.text, obs.admissible_commands)
        for step in range(max(PROMPT_STEPS) + 1):
            if step in PROMPT_STEPS:
                states.append(copy.deepcopy(state))
            if obs.done:
                break
            action = env.expert_action()
            obs = env.step(action)
            state.advance(action, obs.text, obs.admissible_commands)
    env.close()
    return states
