"""An "inline" weight-transfer backend for vLLM: the update carries the tensors themselves.

vLLM syncs trainer weights into a running engine with a four-phase protocol
(init_weight_transfer_engine, start_weight_update, update_weights, finish_weight_update)
and pluggable transports. Its own transports (nccl, ipc) need CUDA; this one runs anywhere,
CPU included: each chunk of tensors travels inside `update_info`, as the bytes of a
safetensors file (no pickle), through vLLM's RPC to every worker.
On GPU clusters the same protocol runs with `policy.vllm.weight_transfer=nccl` instead.

vLLM imports this module in each of its processes through the `vllm.general_plugins`
entry point declared in pyproject.toml (`register` below).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

INLINE = "inline"


@dataclass
class InlineInitInfo(WeightTransferInitInfo):
    pass  # nothing to set up: no communicator


@dataclass
class InlineUpdateInfo(WeightTransferUpdateInfo):
    safetensors: bytes = b""  # Hugging Face parameter names -> tensors, as a safetensors file


def inline_update(tensors: dict[str, torch.Tensor]) -> dict:
    """The `update_info` of one chunk of weights."""
    owned, storages = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in storages:  # tied weights: safetensors wants copies
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        owned[name] = tensor
    return {"safetensors": save_safetensors(owned)}


class InlineWeightTransferEngine(WeightTransferEngine[InlineInitInfo, InlineUpdateInfo]):
    init_info_cls = InlineInitInfo
    update_info_cls = InlineUpdateInfo

    def init_transfer_engine(self, init_info: InlineInitInfo) -> None:
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

    def receive_weights(self, update_info: InlineUpdateInfo) -> None:
        self.model.load_weights(list(load_safetensors(update_info.safetensors).items()))

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        pass


def register() -> None:
    """The `vllm.general_plugins` entry point; vLLM may call it more than once per process."""
    if INLINE not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(INLINE, InlineWeightTransferEngine)
