"""The replicas of one service (policy servers, PRM servers) behind one picklable handle.

A replica whose process dies (a crash, an OOM kill, a lost node) is restarted by Ray up to
its service's `max_restarts`, and the calls that were in flight on it are sent again to the
new process (`replica_options`). The new process starts from its constructor's arguments,
the weights the service started with, so a service also keeps what it serves now in a
`LatestVersion` actor, where a restarted replica catches up before it answers anything.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import re
import zlib
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


class ReplicaUnusable(RuntimeError):
    """A replica refuses requests: its weights could not be loaded, so it may serve a half-loaded model."""


def unrecoverable(error: BaseException) -> str | None:
    """One line for a failure no retry gets past, found at the root of a chain of Ray task
    errors (a rollout worker's episode failed because the policy server died, say): an actor
    dead with its restarts used up, or a replica that refuses requests. None for other errors."""
    while isinstance(error, ray.exceptions.RayTaskError) and error.cause not in (None, error):
        error = error.cause
    if isinstance(error, ReplicaUnusable):
        return str(error)
    if not isinstance(error, ray.exceptions.ActorDiedError):
        return None
    text = str(error)
    name, pid = re.search(r"class_name: (\w+)", text), re.search(r"pid: (\d+)", text)
    cause = re.search(r"The actor is dead because ([^.]*)", text) or re.search(r"The actor died because ([^,.]*)", text)
    return (f"the {name.group(1) if name else 'actor'} actor{f' (pid {pid.group(1)})' if pid else ''} died with no "
            f"restarts left: {cause.group(1) if cause else text.splitlines()[0]}")


def replica_options(max_restarts: int) -> dict:
    """Ray actor options of a replica: restarted up to `max_restarts` times, its calls in flight
    retried on the restarted process for as long as it has restarts left."""
    return {"max_restarts": max_restarts, "max_task_retries": -1}


class LatestVersion:
    """The newest version a service was told to serve, and what loads it (the policy's weights,
    a PRM folder), kept in the object store by this actor, which owns the copy: it outlives the
    learner that pushed it. Placed on the node of the process that starts the service (the
    driver's), so losing a replica's node does not lose it."""

    def __init__(self):
        self.version, self.source = 0, None

    def keep(self, version: int, source: Any, replace: bool = False) -> int:
        """Keep `source` (an ObjectRef passed directly is fetched and stored anew here) as
        `version` unless a newer one is kept, or in any case with `replace` (a policy learner
        that resumed from a checkpoint pushes lower versions than the run it replaces);
        returns the version kept."""
        if replace or version >= self.version:
            self.version, self.source = version, ray.put(source)
        return self.version

    def latest(self) -> tuple[int, Optional[list]]:
        """(version, [ObjectRef of its source]); (0, None) before anything was kept."""
        return self.version, None if self.source is None else [self.source]


class CatchUp:
    """A replica's catch-up with its service's `LatestVersion`: once, before its first answer,
    `load(version, source)` runs if a newer version than the replica's own was kept (source is
    None for a version kept without what loads it). Under `lock`, which the replica's own loads
    also hold. No `latest`: nothing to catch up with. A restarted replica says on the console
    which version it serves (`service` names it)."""

    def __init__(self, latest, lock: asyncio.Lock, service: str):
        self.latest, self.lock, self.done, self.service = latest, lock, latest is None, service
        # (called from the replica's __init__: a Ray actor, where the runtime context knows it)
        self.restarted = latest is not None and ray.get_runtime_context().was_current_actor_reconstructed

    async def __call__(self, version: int, load: Callable[[int, Any], Awaitable[None]]) -> None:
        """Failing to fetch the version (its source lost, say) fails this call, and the next one
        tries again; a load that fails is not tried again: it raises `ReplicaUnusable`, and the
        replica refuses requests from then on (it may hold half the weights)."""
        if self.done:
            return
        async with self.lock:
            if self.done:
                return
            latest, source = await self.latest.latest.remote()
            fetched = await source[0] if latest > version and source else None
            self.done = True  # from here a failure is the load's: not tried again
            if latest > version:
                try:
                    await load(latest, fetched)
                except ReplicaUnusable:
                    raise
                except Exception as e:
                    raise ReplicaUnusable(f"{self.service} replica unusable: restarted, it could not load "
                                          f"version {latest}: {e!r}") from e
        if self.restarted:
            print(f"{self.service}: replica restarted (pid {os.getpid()}), at version {max(latest, version)}",
                  flush=True)


def start_latest_version():
    """A `LatestVersion` actor on this process's node (no CPU of its own)."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(LatestVersion).options(num_cpus=0, scheduling_strategy=here).remote()


@dataclass
class Replicas:
    """Actor handles of a service's replicas: round-robin picking, a call on every replica,
    shutdown. Picklable (rollout workers and learners hold one); each holder keeps its own
    round-robin turn. `latest`: the service's `LatestVersion`, where new versions are kept
    before the replicas load them."""
    servers: list
    latest: Any

    def __post_init__(self):
        self._turn = itertools.count()

    def __getstate__(self):
        return {"servers": self.servers, "latest": self.latest}

    def __setstate__(self, state):
        self.servers, self.latest = state["servers"], state["latest"]
        self.__post_init__()

    def next_replica(self) -> int:
        return next(self._turn) % len(self.servers)

    def replica_for(self, session: str | None) -> int:
        """The replica of a session (an episode id: its requests share their history, which
        that replica caches); round-robin without one."""
        if session is None:
            return self.next_replica()
        return zlib.crc32(session.encode()) % len(self.servers)

    def call_all(self, method: str, *args, timeout_s: float = 300) -> list:
        """`method(*args)` on every replica, their results in replica order (a replica still
        starting answers once it is up)."""
        return ray.get([getattr(s, method).remote(*args) for s in self.servers], timeout=timeout_s)

    def keep_latest(self, version: int, source: Any, timeout_s: float = 600, replace: bool = False) -> None:
        """Record `version` and what loads it (an ObjectRef or a small value) before the
        replicas load it: a replica restarted from then on comes back serving it."""
        ray.get(self.latest.keep.remote(version, source, replace), timeout=timeout_s)

    def latest_version(self) -> int:
        """The version kept last (what every replica serves once its loads are done)."""
        return ray.get(self.latest.latest.remote())[0]

    def shutdown(self) -> None:
        """Let each live replica stop what it runs (engine processes, endpoints), then kill it."""
        try:
            for stopped in [s.shutdown.remote() for s in self.servers]:
                try:
                    ray.get(stopped, timeout=120)
                except ray.exceptions.ActorDiedError:
                    pass  # dead for good (out of restarts): nothing runs there any more
        finally:
            for s in self.servers:
                ray.kill(s, no_restart=True)
            ray.kill(self.latest, no_restart=True)
