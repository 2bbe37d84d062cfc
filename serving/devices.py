"""Where a served model runs and in what precision (the policy's transformers engine, the PRM)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CPU_BF16_FLAGS = re.compile(r"\b(avx512_bf16|amx_bf16)\b")


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_computes_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere torch
    emulates it, slower than float32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return bool(_CPU_BF16_FLAGS.search(cpuinfo))


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 where the hardware computes in it (a CUDA GPU that supports it, a CPU
    with AVX512-BF16 or AMX: on one, vLLM generated 1.4-1.6x faster than in float32, see the
    README), else float32."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_computes_bf16() else torch.float32
