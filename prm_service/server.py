"""PRM service: Ray actors that score (state, action) pairs in batches, behind one handle.

Rollout workers (Best-of-N) and the DPO learner ask for the scores of a few responses to
one prompt at a time; each replica merges concurrent requests into one batch (up to
`prm_service.max_batch_size` pairs, waiting at most `max_wait_ms`), and encodes each
distinct prompt once. A newer PRM checkpoint replaces the weights in place, between
batches, and every score carries the PRM version that produced it. A replica that Ray
restarted after its process died loads the latest checkpoint before it scores anything
(serving/replicas.py); one whose load failed refuses requests rather than score with
older (or half-loaded) weights.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import ray
import torch

from serving.batching import DynamicBatcher
from serving.replicas import CatchUp, Replicas, ReplicaUnusable, replica_options, start_latest_version
from prm_service.scorer import PRMScorer, ScoreRequest


@dataclass
class ScoreResult:
    # Q(s, a) of each response, in order: the head's logit (sigmoid(Q) estimates the rescaled target)
    scores: list[float]
    prm_version: int


class PRMServer:
    """One replica. Use through `start_prm_servers`, which returns a `PRMClient`. `latest`: the
    service's `LatestVersion`, whose checkpoint (if a newer one was loaded) the replica loads
    before its first answer."""

    def __init__(self, model_path: str, prm_cfg: dict, version: int = 0, latest=None):
        torch.set_num_threads(max(1, prm_cfg["torch_threads"] or int(prm_cfg["num_cpus"])))
        self.scorer = PRMScorer(model_path, device=prm_cfg["device"], dtype=prm_cfg["dtype"],
                                trust_remote_code=prm_cfg["trust_remote_code"], share_prompt=prm_cfg["share_prompt"],
                                cached_states=prm_cfg["cached_states"])
        self.version = version
        print(f"PRM service: {str(self.scorer.model.dtype).removeprefix('torch.')} on {self.scorer.device.type}, "
              f"{model_path}", flush=True)
        self._batcher = DynamicBatcher(self._run_batch, prm_cfg["max_batch_size"], prm_cfg["max_wait_ms"] / 1000,
                                       size=lambda request: len(request.responses))
        self._stats = {"requests": 0, "pairs": 0}
        self._broken: str | None = None  # why this replica refuses requests
        self._catch_up = CatchUp(latest, asyncio.Lock(), "PRM service")

    async def _load_latest(self, version: int, model_path: str) -> None:
        await self._batcher.run_exclusive(self._load, model_path, version)

    async def score(self, prompt_ids: list[int], responses: list[list[int]]) -> ScoreResult:
        await self._catch_up(self.version, self._load_latest)
        if self._broken:
            raise ReplicaUnusable(f"PRM service replica unusable: {self._broken}")
        self._stats["requests"] += 1
        return await self._batcher.submit(ScoreRequest(list(prompt_ids), [list(r) for r in responses]))

    async def load(self, model_path: str, version: int) -> int:
        """Load a newer checkpoint (a version not above the current one is ignored); returns
        the version now served."""
        await self._catch_up(self.version, self._load_latest)
        return await self._batcher.run_exclusive(self._load, model_path, version)

    def _load(self, model_path: str, version: int) -> int:
        """On the model's thread, between batches: a batch sees the old weights and version or
        the new ones, and of two loads in flight the newer version wins."""
        if version > self.version:
            try:
                self.scorer.load(model_path)
            except BaseException as e:
                self._broken = f"loading PRM version {version} from {model_path} failed: {e!r}"
                raise
            self.version = version
        return self.version

    async def get_stats(self) -> dict[str, int]:
        await self._catch_up(self.version, self._load_latest)
        return {**self._stats, "batches": self._batcher.batches, "forward_passes": self.scorer.forward_passes,
                "computed_tokens": self.scorer.computed_tokens,
                "version": self.version}

    def shutdown(self) -> None:
        self._batcher.shutdown()

    def _run_batch(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        scores = self.scorer.score(requests)
        self._stats["pairs"] += sum(len(s) for s in scores)
        return [ScoreResult(s, self.version) for s in scores]


@dataclass
class PRMClient(Replicas):
    """All PRM replicas behind one handle (picklable: rollout workers and learners hold one);
    an episode's requests go to one replica (its history is cached there), others are spread
    round-robin; checkpoint loads reach every replica."""

    def score(self, prompt_ids: list[int], responses: list[list[int]], session: str | None = None
              ) -> ray.ObjectRef:
        """An ObjectRef of a `ScoreResult` (await it in async code, ray.get it elsewhere): Q of
        each response (ids as generated) to the state `prompt_ids`. Requests of one `session`
        (an episode) go to one replica, where the state's history is cached."""
        return self.servers[self.replica_for(session)].score.remote(prompt_ids, responses)

    def load(self, model_path: str, version: int, timeout_s: float = 600) -> list[int]:
        """Every replica loads the checkpoint unless it already serves `version` or newer; the
        checkpoint is kept first, for replicas restarted later."""
        self.keep_latest(version, model_path, timeout_s)
        return self.call_all("load", model_path, version, timeout_s=timeout_s)

    def stats(self) -> list[dict[str, int]]:
        return self.call_all("get_stats")


def start_prm_servers(prm_cfg: Any, model_path: str, version: int = 0) -> PRMClient:
    """`prm_service.replicas` actors serving the PRM at `model_path`, behind one `PRMClient`;
    each is restarted up to `prm_service.max_restarts` times."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(prm_cfg, resolve=True) if not isinstance(prm_cfg, dict) else prm_cfg
    actor = ray.remote(PRMServer).options(num_cpus=cfg["num_cpus"], num_gpus=cfg["num_gpus"],
                                          resources=dict(cfg["resources"]), max_concurrency=10_000,
                                          **replica_options(cfg["max_restarts"]))
    latest = start_latest_version()
    return PRMClient([actor.remote(model_path, cfg, version, latest) for _ in range(cfg["replicas"])], latest)
