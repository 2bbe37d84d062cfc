"""A "local_file" weight-transfer backend for vLLM: new weights as a safetensors file on the
engine's host.

vLLM syncs trainer weights into a running engine with a four-phase protocol
(init_weight_transfer_engine, start_weight_update, update_weights, finish_weight_update)
and pluggable transports. Its own transports (nccl, ipc) need CUDA. This one runs anywhere,
CPU included: the policy server (on the engine's host) writes the weights it received as a
safetensors file, in /dev/shm when it has room, and the update names that file; every vLLM
worker reads it (no pickle). For a 135M model that is about 3x faster here than sending
the bytes through vLLM's RPC. On GPU clusters the same protocol runs with
`policy.vllm.weight_transfer=nccl` instead.

vLLM imports this module in each of its processes through the `vllm.general_plugins`
entry point declared in pyproject.toml (`register` below).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

LOCAL_FILE = "local_file"


@dataclass
class LocalFileInitInfo(WeightTransferInitInfo):
    pass  # nothing to set up: no communicator


@dataclass
class LocalFileUpdateInfo(WeightTransferUpdateInfo):
    path: str = ""  # a safetensors file of Hugging Face parameter names -> tensors, on this host


@contextmanager
def staged_weights(state_dict: dict[str, torch.Tensor]) -> Iterator[dict]:
    """Write `state_dict` as a safetensors file and yield the `update_info` naming it; the
    file is removed afterwards (once `update_weights` has returned, every worker has read it)."""
    tensors, storages = {}, set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in storages:  # tied weights: safetensors wants copies
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    size = sum(t.nbytes for t in tensors.values())
    shm = "/dev/shm"
    folder = shm if os.path.isdir(shm) and shutil.disk_usage(shm).free > 2 * size else tempfile.gettempdir()
    path = os.path.join(folder, f"agentprm-weights-{uuid.uuid4().hex}.safetensors")
    try:
        try:
            save_file(tensors, path)
        except OSError:  # /dev/shm filled up meanwhile (other replicas, Ray's object store)
            if os.path.exists(path):
                os.unlink(path)
            path = os.path.join(tempfile.gettempdir(), os.path.basename(path))
            save_file(tensors, path)
        yield {"path": path}
    finally:
        if os.path.exists(path):
            os.unlink(path)


class LocalFileWeightTransferEngine(WeightTransferEngine[LocalFileInitInfo, LocalFileUpdateInfo]):
    init_info_cls = LocalFileInitInfo
    update_info_cls = LocalFileUpdateInfo

    def init_transfer_engine(self, init_info: LocalFileInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        # Checkpoint-format weights: vLLM re-runs each layer's post-load processing
        # (fused QKV, quantisation) once all of the layer's tensors have arrived.
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type != "cpu":
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: LocalFileUpdateInfo) -> None:
        with safe_open(update_info.path, framework="pt") as weights:  # one tensor in memory at a time
            self.model.load_weights((name, weights.get_tensor(name)) for name in weights.keys())

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        pass


def register() -> None:
    """The `vllm.general_plugins` entry point; vLLM may call it more than once per process."""
    if LOCAL_FILE not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(LOCAL_FILE, LocalFileWeightTransferEngine)
