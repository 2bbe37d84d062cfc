"""The replicas of one service (policy servers, PRM servers) behind one picklable handle."""
from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass

import ray


@dataclass
class Replicas:
    """Actor handles of a service's replicas: round-robin picking, a call on every replica,
    shutdown. Picklable (rollout workers and learners hold one); each holder keeps its own
    round-robin turn."""
    servers: list

    def __post_init__(self):
        self._turn = itertools.count()

    def __getstate__(self):
        return {"servers": self.servers}

    def __setstate__(self, state):
        self.servers = state["servers"]
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

    def shutdown(self) -> None:
        """Let each replica stop what it runs (engine processes, endpoints), then kill it."""
        try:
            self.call_all("shutdown", timeout_s=120)
        finally:
            for s in self.servers:
                ray.kill(s)
