"""The reward-hacking monitor: the PRM's opinion of the policy next to the real success rate.

A PRM fit on few rollouts can be gamed: while the policy trains against it, the PRM's
scores of the policy's actions keep rising as real success peaks and falls (the paper's
Figure 3). So while the learner trains, every `every`-th policy version the servers report
is measured twice: the PRM's mean score of the policy's responses on held-out states, and
the success rate on a fixed set of eval games played against the policy server. A
background thread of the driver does it; each measurement is appended to a JSONL file as
it completes, and a resumed run continues that file. The learner keeps pushing while the
games are played, so a record also says which versions played them.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.compute as pc
import ray

from policy_server import PolicyClient, SamplingParams
from prm_service import PRMClient
from rollout_workers.evaluation import summarize
from rollout_workers.records import read_steps
from rollout_workers.runner import run_episodes
from rollout_workers.tasks import EpisodeTask


class RewardHackingMonitor:
    def __init__(self, policy: PolicyClient, prm: PRMClient, workers: list, envs_per_worker: int,
                 states: list[list[int]], tasks: list[EpisodeTask], sampling: SamplingParams, out: Path,
                 every: int = 1, poll_s: float = 5.0):
        self.policy, self.prm, self.workers, self.envs_per_worker = policy, prm, workers, envs_per_worker
        self.states, self.tasks, self.sampling, self.out = states, tasks, sampling, out
        self.every, self.poll_s = every, poll_s
        self.log = out / "monitor.jsonl"  # holds the measurements of earlier runs of this stage, if it resumes
        self.records: list[dict] = ([json.loads(line) for line in self.log.read_text().splitlines()]
                                    if self.log.exists() else [])
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="reward-hacking-monitor", daemon=True)

    def start(self) -> None:
        self.policy.wait_ready()
        self._thread.start()

    def stop(self) -> list[dict]:
        """Stop watching; the version served last is measured if it was not yet. A failure of
        the monitor is reported, not raised: the training it watched has finished."""
        self._stop.set()
        self._thread.join()
        if self.error:
            print(f"monitor: stopped early by {self.error!r}; {len(self.records)} measurements kept", flush=True)
        version = max(self.policy.versions())
        if not self.records or self.records[-1]["version"] != version:
            self.measure(version)
        return self.records

    def close(self, timeout_s: float = 120) -> None:
        """Stop watching without a last measurement (after a failure). Call it once the
        servers and workers are gone, so that a measurement in flight fails fast."""
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                version = max(self.policy.versions())
                if not self.records or version >= self.records[-1]["version"] + self.every:
                    self.measure(version)
                else:
                    self._stop.wait(self.poll_s)
        except BaseException as e:  # reported by stop(), in the driver's thread
            self.error = e

    def measure(self, version: int) -> dict:
        start = time.monotonic()
        scores = None
        if self.states:
            generated = ray.get([self.policy.generate([s], replace(self.sampling, seed=i))
                                 for i, s in enumerate(self.states)])
            responses = [g.generations[0][0].token_ids for g in generated]
            scored = ray.get([self.prm.score(s, [r]) for s, r in zip(self.states, responses)])
            scores = [s.scores[0] for s in scored]
        episodes = self.out / f"episodes_v{version}"
        run_episodes(self.workers, self.envs_per_worker, self.tasks, episodes, desc=f"monitor, version {version}")
        steps = read_steps(episodes, [t.episode_id for t in self.tasks])
        report = summarize(steps)
        record = {"version": version, "prm_mean_score": sum(scores) / len(scores) if scores else None,
                  "held_out_states": len(self.states), "success_rate": report["success_rate"],
                  "games": len(self.tasks), "played_by_versions": [pc.min(steps["policy_version"]).as_py(),
                                                                    pc.max(steps["policy_version"]).as_py()],
                  "seconds": round(time.monotonic() - start, 1)}
        self.records.append(record)
        with self.log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"monitor: version {version}: PRM mean score {record['prm_mean_score']}, "
              f"success {record['success_rate']:.1%} on {len(self.tasks)} games", flush=True)
        return record
