"""Rollout worker: a Ray actor holding several ALFWorld environments.

`play(task)` runs one whole episode in a free environment. The actor is async with one
slot per environment, so while one episode awaits the policy server, the worker steps
another; episodes of all workers meet in the policy server's batches. An episode's requests
all go to one replica (its prompts share their history: prefix caching). The policy's
state is built in token ids (`agent.episode`, `prompt.state`): the server is sent ids and
returns ids, which the step records keep.

With a PRM (Best-of-N), each step samples N responses, merges those that send the same
command, and plays the one the PRM scores highest.
"""
from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, replace

from agent import command_to_send, format_response, parse_action
from agent.episode import ChatFormat, StepInput, new_context
from envs import AlfworldEnv
from policy_server import Generation, PolicyClient, SamplingParams
from prm_service import PRMClient
from rollout_workers.records import StepRecord
from rollout_workers.tasks import EpisodeTask

NOT_THE_POLICY = -1  # policy_version of expert and random steps


@dataclass
class Action:
    """What the agent sent at one step, and how it was chosen."""
    response: str
    response_ids: list[int]
    policy_version: int
    candidates: int = 1
    prm_score: float | None = None
    candidate_actions: list[str] | None = None  # Best-of-N: what the PRM chose among
    candidate_samples: list[int] | None = None
    candidate_scores: list[float] | None = None


class RolloutWorker:
    """Use through `start_rollout_workers`. `agent` is "llm", "expert" or "random"; with `prm`,
    the llm agent plays Best-of-`sampling.n`. `prompt` is the config's prompt section."""

    def __init__(self, worker_id: int, num_envs: int, agent: str, tokenizer_path: str, max_steps: int,
                 prompt: dict, policy: PolicyClient | None, sampling: SamplingParams | None = None,
                 prm: PRMClient | None = None):
        from transformers import AutoTokenizer

        self.worker_id = worker_id
        self.agent = agent
        self.prompt = prompt
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.chat = ChatFormat(self.tokenizer)
        self.policy = policy
        self.sampling = sampling or SamplingParams()
        self.prm = prm
        self._free_envs = [AlfworldEnv(max_steps, with_expert=agent == "expert") for _ in range(num_envs)]

    async def play(self, task: EpisodeTask) -> list[StepRecord]:
        """Play one episode to its end and return its step records."""
        env = self._free_envs.pop()  # the actor's concurrency equals the number of environments
        rng = random.Random(task.seed)
        try:
            obs = env.reset(task.game)
            room, admissible = obs.text, obs.admissible_commands
            context = new_context(self.chat, self.prompt, env.task, room, admissible, self.sampling.max_tokens)
            for command in task.reset_actions:
                obs = env.step(command)
                if obs.done:
                    raise RuntimeError(f"{task.episode_id}: the game ended within its {len(task.reset_actions)} "
                                       "reset actions")
                context.advance(self.chat.response(format_response(command)), command, obs.text,
                                obs.admissible_commands)
                admissible = obs.admissible_commands
            steps: list[StepRecord] = []
            while True:
                fed = context.next_input()
                started = time.perf_counter()
                act = await self._act(fed, admissible, env, task, rng, task.seed + len(steps))
                act_seconds = time.perf_counter() - started
                action = command_to_send(act.response)
                valid = parse_action(act.response) is not None and action in admissible
                obs = env.step(action)
                steps.append(StepRecord(
                    game_id=task.game.game_id, task_type=task.game.task_type, episode_id=task.episode_id,
                    step=len(task.reset_actions) + len(steps), task=env.task, room=room,
                    admissible_commands=admissible, prompt=self.tokenizer.decode(fed.prompt_ids),
                    prompt_ids=fed.new_ids, context_start=fed.reset, context_rule=fed.rule,
                    response=act.response, response_ids=act.response_ids, action=action, valid=valid,
                    observation=obs.text, reward=1.0 if obs.won else 0.0, done=obs.done, won=obs.won,
                    policy_version=act.policy_version, worker_id=self.worker_id, act_seconds=act_seconds,
                    candidates=act.candidates, prm_score=act.prm_score, candidate_actions=act.candidate_actions,
                    candidate_samples=act.candidate_samples, candidate_scores=act.candidate_scores,
                ))
                if obs.done:
                    return steps
                context.advance(act.response_ids, action, obs.text, obs.admissible_commands)
                admissible = obs.admissible_commands
        finally:
            env.close()
            self._free_envs.append(env)

    async def _act(self, fed: StepInput, admissible: list[str], env: AlfworldEnv, task: EpisodeTask,
                   rng: random.Random, seed: int) -> Action:
        if self.agent in ("expert", "random"):
            command = env.expert_action() if self.agent == "expert" else rng.choice(admissible)
            response = format_response(command)
            return Action(response, self.chat.response(response), NOT_THE_POLICY)
        result = await self.policy.generate([fed.prompt_ids], replace(self.sampling, seed=seed),
                                            session=task.episode_id)
        samples = result.generations[0]
        if self.prm is None:
            return Action(samples[0].text, samples[0].token_ids, result.policy_version)
        return await self._best_of_n(fed.prompt_ids, samples, result.policy_version, task.episode_id)

    async def _best_of_n(self, prompt_ids: list[int], samples: list[Generation], policy_version: int,
                         episode_id: str) -> Action:
        """The PRM's argmax among the samples, one per distinct command (the first sample that
        sends it); invalid samples compete too: the PRM has seen such actions fail. When every
        sample sends the same command there is nothing to choose and the PRM is not asked. The
        PRM reads the ids the policy saw and wrote; an episode's requests go to one PRM replica,
        which keeps its history cached."""
        by_command: dict[str, Generation] = {}
        for sample in samples:
            by_command.setdefault(command_to_send(sample.text), sample)
        commands = list(by_command)
        counts = Counter(command_to_send(sample.text) for sample in samples)
        chosen = Action(samples[0].text, samples[0].token_ids, policy_version, candidate_actions=commands,
                        candidate_samples=[counts[c] for c in commands])
        if len(commands) == 1:
            return chosen
        candidates = list(by_command.values())
        scored = await self.prm.score(prompt_ids, [c.token_ids for c in candidates], session=episode_id)
        best = max(range(len(candidates)), key=lambda i: scored.scores[i])  # the first of equal scores
        return replace(chosen, response=candidates[best].text, response_ids=candidates[best].token_ids,
                       candidates=len(candidates), prm_score=scored.scores[best],
                       candidate_scores=list(scored.scores))

