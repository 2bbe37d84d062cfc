"""Rollout worker: a Ray actor holding several ALFWorld environments.

`play(task)` runs one whole episode in a free environment. The actor is async with one
slot per environment, so while one episode awaits the policy server, the worker steps
another; episodes of all workers meet in the policy server's batches. An episode's requests
all go to one replica (its prompts share their history: prefix caching).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

from agent import AgentState, command_to_send, format_response, parse_action, render_prompt
from envs import AlfworldEnv, Game
from policy_server import PolicyClient, SamplingParams
from rollout_workers.records import StepRecord

NOT_THE_POLICY = -1  # policy_version of expert and random steps


@dataclass(frozen=True)
class EpisodeTask:
    game: Game
    episode_index: int  # several episodes of one game are told apart by this
    seed: int

    @property
    def episode_id(self) -> str:
        return f"{self.game.game_id}#{self.episode_index}"


class RolloutWorker:
    """Use through `start_rollout_workers`. `agent` is "llm", "expert" or "random"."""

    def __init__(self, worker_id: int, num_envs: int, agent: str, tokenizer_path: str, max_steps: int,
                 history_turns: int, policy: PolicyClient | None, sampling: SamplingParams | None = None):
        from transformers import AutoTokenizer

        self.worker_id = worker_id
        self.agent = agent
        self.history_turns = history_turns
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.policy = policy
        self.sampling = sampling
        self._free_envs = [AlfworldEnv(max_steps=max_steps) for _ in range(num_envs)]

    async def play(self, task: EpisodeTask) -> list[StepRecord]:
        """Play one episode to its end and return its step records."""
        env = self._free_envs.pop()  # the actor's concurrency equals the number of environments
        rng = random.Random(task.seed)
        try:
            obs = env.reset(task.game)
            state = AgentState(env.task, obs.text, obs.admissible_commands)
            steps: list[StepRecord] = []
            while True:
                prompt = render_prompt(self.tokenizer, state, self.history_turns)
                response, version = await self._act(prompt, state, env, task, rng, task.seed + len(steps))
                action = command_to_send(response)
                valid = parse_action(response) is not None and action in state.admissible_commands
                obs = env.step(action)
                steps.append(StepRecord(
                    game_id=task.game.game_id, task_type=task.game.task_type, episode_id=task.episode_id,
                    step=len(steps), prompt=prompt, response=response, action=action, valid=valid,
                    observation=obs.text, reward=1.0 if obs.won else 0.0, done=obs.done, won=obs.won,
                    policy_version=version, worker_id=self.worker_id,
                ))
                if obs.done:
                    return steps
                state.advance(action, obs.text, obs.admissible_commands)
        finally:
            env.close()
            self._free_envs.append(env)

    async def _act(self, prompt: str, state: AgentState, env: AlfworldEnv, task: EpisodeTask,
                   rng: random.Random, seed: int) -> tuple[str, int]:
        if self.agent == "expert":
            return format_response(env.expert_action()), NOT_THE_POLICY
        if self.agent == "random":
            return format_response(rng.choice(state.admissible_commands)), NOT_THE_POLICY
        result = await self.policy.generate([prompt], replace(self.sampling, seed=seed), session=task.episode_id)
        return result.generations[0][0].text, result.policy_version
