"""Benchmarks: each prints its figures and saves them, with the machine's, as JSON in bench/results/."""
from __future__ import annotations

import os
import platform


def machine(torch_threads: int) -> dict:
    """What the figures were measured on."""
    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "torch_threads": torch_threads, "python": platform.python_version()}
