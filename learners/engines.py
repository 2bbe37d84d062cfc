"""How a learner worker updates its model: a DeepSpeed engine (ZeRO) or plain DDP.

Both wrap a model, a torch optimizer and a learning-rate schedule and give the training
loop the same calls, so a recipe reads the same whichever runs underneath:

    loss = loss_fn(engine(**inputs), batch); engine.backward(loss); engine.step()  # every micro-batch
    engine.save(folder); engine.load(folder)                                     # all ranks
    weights = engine.export_state_dict()                                         # all ranks; full on rank 0

`step()` takes an optimizer step at the end of each gradient-accumulation window only.
On CPU, DeepSpeed runs on gloo with the torch optimizer it is handed (its own Adam would
compile C++ ops first); on GPU, on NCCL.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model


class TrainEngine(Protocol):
    module: torch.nn.Module  # the Hugging Face model inside

    def __call__(self, **inputs): ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...

    def export_state_dict(self) -> dict[str, torch.Tensor] | None: ...


def use_environment_extensions_dir() -> str:
    """Point torch's C++ extension builds (DeepSpeed's CPU ops) at a folder of this Python
    environment, unless TORCH_EXTENSIONS_DIR is set: environments with other torch builds
    sharing one folder rebuild the ops in turn. Set-up builds them here once, so learner
    workers load them rather than race to compile them."""
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def build_cpu_ops() -> None:
    """Compile DeepSpeed's CPU shared-memory collective op into this environment's folder
    (a no-op when it is built). A build killed midway leaves its lock file behind, and every
    later build would wait on it forever: a stale lock is removed first."""
    from torch.utils.cpp_extension import _get_build_directory

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    use_environment_extensions_dir()
    Path(_get_build_directory("deepspeed_shm_comm", False), "lock").unlink(missing_ok=True)
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ShareMemCommBuilder().load(verbose=False)


def make_train_engine(backend: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                      micro_batch_size: int, accumulation_steps: int, zero_stage: int, grad_clip: float,
                      dtype: str) -> TrainEngine:
    if backend == "deepspeed":
        return DeepSpeedEngine(model, optimizer, scheduler, micro_batch_size, accumulation_steps, zero_stage,
                               grad_clip, dtype)
    if backend == "ddp":  # float32 only (configs refuse other dtypes for it)
        return DDPEngine(model, optimizer, scheduler, accumulation_steps, grad_clip)
    raise ValueError(f"unknown learner backend {backend!r}")


class DeepSpeedEngine:
    def __init__(self, model, optimizer, scheduler, micro_batch_size: int, accumulation_steps: int,
                 zero_stage: int, grad_clip: float, dtype: str):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        import deepspeed

        self.zero_stage = zero_stage
        config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": accumulation_steps,
            "train_batch_size": micro_batch_size * accumulation_steps * dist.get_world_size(),
            "gradient_clipping": grad_clip,
            "zero_optimization": {"stage": zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
            "zero_allow_untested_optimizer": True,  # the torch optimizer we hand it
            "bf16": {"enabled": dtype == "bfloat16"},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=config, dist_init_required=False)
        self.module = self.engine.module

    def __call__(self, **inputs):
        return self.engine(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scaled by 1 / accumulation steps inside

    def step(self) -> None:
        self.engine.step()

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag="deepspeed")

    def load(self, folder: Path) -> None:
        # DeepSpeed checkpoints are torch pickles: only folders this run wrote are loaded.
        path, _ = self.engine.load_checkpoint(str(folder), tag="deepspeed")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {folder}")

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.zero_stage == 3:  # parameters are partitioned: gather them on rank 0
            state = self.engine._zero3_consolidated_16bit_state_dict()
            return state if dist.get_rank() == 0 else None
        if dist.get_rank() != 0:
            return None
        # Under ZeRO the parameters are views into one flat buffer; serialising a view (to send
        # it to the policy server) copies its whole buffer: SmolLM2's 272 tensors took rank 0
        # past 16 GB.
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}


class DDPEngine:
    """Plain PyTorch DistributedDataParallel: the baseline DeepSpeed is measured against."""

    def __init__(self, model, optimizer, scheduler, accumulation_steps: int, grad_clip: float):
        on_gpu = next(model.parameters()).is_cuda
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[next(model.parameters()).device] if on_gpu else None)
        self.module = model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.accumulation_steps, self.grad_clip = accumulation_steps, grad_clip
        self._micro = 0

    def __call__(self, **inputs):
        if (self._micro + 1) % self.accumulation_steps:  # inside the window: no gradient all-reduce yet
            with self.ddp.no_sync():
                return self.ddp(**inputs)
        return self.ddp(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation_steps).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.accumulation_steps:
            return
        if self.grad_clip > 0:  # 0 = no clipping, as in DeepSpeed
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, folder: Path) -> None:
        if dist.get_rank() == 0:  # every rank holds the same state
            folder.mkdir(parents=True, exist_ok=True)
            save_model(self.module, str(folder / "model.safetensors"))  # handles tied weights
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        load_model(self.module, str(folder / "model.safetensors"))
        state = torch.load(folder / "optimizer.pt", weights_only=True)  # tensors and numbers only
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.module.state_dict() if dist.get_rank() == 0 else None
