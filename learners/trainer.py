"""Ray Train plumbing shared by the learners: the job, the step loop, checkpoints, metrics.

A recipe is a plain function run on every Ray Train worker (`TorchTrainer`), which has set
up torch.distributed (gloo on CPU, NCCL on GPU) before it starts. It builds its examples
and model, then hands `train_steps` a loss for a micro-batch of examples:

    engine, optimizer = build_engine(model, train, learner, total_steps)
    train_steps(engine, optimizer, worker_share(examples, train["batch_size"], seed, length), micro_loss, train,
                learner, total_steps, out_dir, "sft")

`run_recipe` starts the job on `learner.num_workers` workers. Checkpoints go through
`ray.train.report`: every rank writes its shard into a local folder and Ray merges them in
the run's storage; after a worker failure (up to `learner.max_failures`), or when the same
command runs again, the loop resumes from the last checkpoint.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from learners.data import epoch_order
from learners.engines import TrainEngine, make_train_engine, use_environment_extensions_dir

M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h
LAST_CHECKPOINT = "last_checkpoint.json"  # in a learner's out_dir: its newest complete checkpoint

# A micro-batch's loss and the numbers to log about it. "tokens" is summed into tokens/s;
# the other numbers are averaged over the step's micro-batches on all workers.
MicroLoss = Callable[[list], tuple[torch.Tensor, dict[str, float]]]


def run_recipe(recipe: Callable[[dict], None], cfg, section: str, out_dir: Path, **inputs) -> None:
    """Run `recipe` on `learner.num_workers` Ray Train workers; raises if the job fails (after
    `learner.max_failures` restarts). The recipe's config: `seed`, `train` (the `section`
    knobs, e.g. cfg.sft), `learner`, `trust_remote_code`, `out_dir`, and its own `inputs`."""
    from omegaconf import OmegaConf

    loop_config = {"seed": cfg.seed, "train": OmegaConf.to_container(cfg[section]),
                   "learner": OmegaConf.to_container(cfg.learner), "trust_remote_code": cfg.policy.trust_remote_code,
                   "out_dir": str(out_dir.resolve()), **inputs}
    learner = cfg.learner
    fit_again_after_startup_deaths(lambda: TorchTrainer(
        recipe, train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=learner.num_workers, use_gpu=learner.use_gpu,
            resources_per_worker={"CPU": learner.num_cpus_per_worker, **learner.resources_per_worker}),
        run_config=RunConfig(name=section, storage_path=str((out_dir / "ray_train").resolve()),
                             failure_config=FailureConfig(max_failures=learner.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),  # each holds optimizer states
    ).fit(), learner.max_failures, section)


def fit_again_after_startup_deaths(fit: Callable[[], Any], max_failures: int, name: str) -> None:
    """`fit()`, run again (at most `max_failures` times) when a learner worker died while its
    group was starting. Ray Train restarts a group whose worker dies while training, but one
    that dies while the group starts is a controller error it does not retry; the new group
    resumes from the last checkpoint (`restore`), as Ray Train's own restart does."""
    for attempt in range(max_failures + 1):
        try:
            fit()
            return
        except ray.train.ControllerError as error:
            if attempt == max_failures or not died_starting(error):
                raise
            print(f"{name}: a learner worker died while its group started; starting the job again "
                  f"({attempt + 1} of learner.max_failures={max_failures})", flush=True)


def died_starting(error: BaseException) -> bool:
    """Whether an actor's death lies in this controller error's chain of causes."""
    seen: BaseException | None = getattr(error, "controller_failure", None)
    while seen is not None:
        if isinstance(seen, ray.exceptions.ActorDiedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def learner_failure(error: BaseException) -> str | None:
    """One line for a learner job that failed for good (its restarts used up, or a failure
    Ray Train does not retry); None for other errors."""
    if not isinstance(error, ray.train.TrainingFailedError):
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    actor = next((line for line in lines if line.startswith("class_name:")), "")
    return (f"the learner job failed ({lines[0].rstrip(':')}{': ' + lines[1] if len(lines) > 1 else ''}"
            f"{', ' + actor if actor else ''})")


def init_worker(seed: int, learner: dict) -> torch.device:
    """Seed and size this worker's torch; its device (cuda:<local rank> on GPU workers, else cpu)."""
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, learner["torch_threads"] or int(learner["num_cpus_per_worker"])))
    use_environment_extensions_dir()  # DeepSpeed's CPU ops, built by set-up
    fix_malloc_mmap_threshold(learner["malloc_mmap_threshold_kb"])
    return ray.train.torch.get_device()


def fix_malloc_mmap_threshold(kib: Optional[int]) -> None:
    """Fix glibc's mmap threshold at `kib` KiB (None: leave glibc's dynamic one), so that freed
    activations go back to the system instead of staying resident between steps
    (`learner.malloc_mmap_threshold_kb`). A no-op where the C library is not glibc."""
    if kib is None or platform.libc_ver()[0] != "glibc":
        return
    if not ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, kib * 1024):
        raise ValueError(f"glibc refused an mmap threshold of {kib} KiB")


def count_steps(train: dict, num_examples: int) -> int:
    """Optimizer steps: `epochs` passes over the examples, capped at `max_steps`."""
    steps = max(1, math.floor(train["epochs"] * num_examples / train["batch_size"]))
    return min(steps, train["max_steps"] or steps)


def build_engine(model: torch.nn.Module, train: dict, learner: dict, total_steps: int
                 ) -> tuple[TrainEngine, torch.optim.Optimizer]:
    """AdamW with linear warm-up and cosine decay, inside the configured engine."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=train["lr"], weight_decay=train["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(train["warmup_steps"], total_steps))
    accumulation = train["batch_size"] // (dist.get_world_size() * train["micro_batch_size"])
    engine = make_train_engine(learner["backend"], model, optimizer, scheduler, train["micro_batch_size"],
                               accumulation, learner["zero_stage"], train["grad_clip"], learner["dtype"])
    return engine, optimizer


def worker_share(examples: list, batch_size: int, seed: int, length: Callable[[Any], int]) -> Callable[[int], list]:
    """This worker's examples of each step: its share of `step_batch`, dealt in order of
    `length` (an example's padded length, or a proxy for it). So each micro-batch holds
    examples of about the same length (little padding), and the ranks' i-th micro-batches
    cost about the same: they meet at every gradient sync (ZeRO-2 syncs on each) together."""
    rank, world = dist.get_rank(), dist.get_world_size()
    return lambda step: sorted(step_batch(examples, step, batch_size, seed), key=length)[rank::world]


def train_steps(engine: TrainEngine, optimizer: torch.optim.Optimizer, batch_for_step: Callable[[int], list],
                micro_loss: MicroLoss, train: dict, learner: dict, total_steps: int, out_dir: Path, prefix: str,
                after_step: Optional[Callable[[int], None]] = None) -> None:
    """Steps 1..total_steps (from the last checkpoint on, if any): each takes this worker's
    examples of the step (`batch_for_step`, e.g. `worker_share`) in micro-batches; metrics
    per step (rank 0), `after_step(step)` on every rank, a checkpoint every
    `checkpoint_every` steps and at the end."""
    rank, world = dist.get_rank(), dist.get_world_size()
    state = restore(engine, out_dir)
    # learner.fail_at_step fails the job once: a marker in out_dir says it already did.
    injected = out_dir / "injected_failure"
    fail_at = learner["fail_at_step"] if not injected.exists() else None
    start_step = state["step"] if state else 0
    log = MetricsLog(out_dir, total_steps, start_step, prefix=prefix) if rank == 0 else None
    if rank == 0 and state:
        print(f"{prefix}: resuming after step {start_step}", flush=True)
    engine.module.train()
    device = next(engine.module.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=learner["autocast_bf16"])
    for step in range(start_step + 1, total_steps + 1):
        if step == fail_at:
            if rank == 0:
                injected.write_text(f"step {step}\n")
            raise RuntimeError(f"injected failure at step {step} (learner.fail_at_step)")
        started, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        mine = batch_for_step(step)
        totals: dict[str, float] = {}
        for i in range(0, len(mine), train["micro_batch_size"]):
            with autocast:
                loss, stats = micro_loss(mine[i:i + train["micro_batch_size"]])
            engine.backward(loss)
            engine.step()
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
        summed = torch.tensor(list(totals.values()), dtype=torch.float64, device=loss.device)
        dist.all_reduce(summed)
        peak_rss = torch.tensor([peak_resident_memory_gb()], dtype=torch.float64, device=loss.device)
        dist.all_reduce(peak_rss, op=dist.ReduceOp.MAX)
        micro_batches = world * math.ceil(len(mine) / train["micro_batch_size"])
        values = dict(zip(totals, summed.tolist()))
        tokens = values.pop("tokens", 0.0)
        metrics = {key: value / micro_batches for key, value in values.items()}
        metrics.update(lr=lr, tokens_per_s=tokens / (time.perf_counter() - started), peak_rss_gb=peak_rss.item())
        if log:
            log.log(step, metrics)
        if after_step:
            after_step(step)
        if step % train["checkpoint_every"] == 0 or step == total_steps:
            save_checkpoint(engine, {"step": step}, metrics, out_dir)
    if log:
        log.close()


def peak_resident_memory_gb() -> float:
    """The most resident memory this process has held so far, in GB (what a machine's memory
    limit is sized against)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def step_batch(examples: list, step: int, batch_size: int, seed: int) -> list:
    """The examples of optimizer step `step` (1-based): consecutive places in a stream of
    epochs, each epoch a seeded shuffle; identical on every worker and after a resume."""
    positions = range((step - 1) * batch_size, step * batch_size)
    orders = {e: epoch_order(len(examples), seed, e) for e in {p // len(examples) for p in positions}}
    return [examples[orders[p // len(examples)][p % len(examples)]] for p in positions]


def warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def export_hf(model, state_dict: dict, tokenizer, folder: Path) -> None:
    """A Hugging Face folder (safetensors + tokenizer), written whole or not at all (rank 0)."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(partial, folder)


def save_checkpoint(engine: TrainEngine, state: dict, metrics: dict, out_dir: Path) -> None:
    """All ranks: the engine's state plus the recipe's `state` (rank 0) become one checkpoint,
    named by its step. Once every rank's part is in storage, rank 0 records it in `out_dir`
    (`LAST_CHECKPOINT`) before any rank goes on: Ray Train counts a checkpoint only when its
    controller has polled every rank's report, so a crash right after `report` could lose it."""
    name = f"checkpoint_step_{state['step']:06d}"
    with tempfile.TemporaryDirectory() as folder:
        engine.save(Path(folder))
        if dist.get_rank() == 0:
            (Path(folder) / "trainer_state.json").write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder), checkpoint_dir_name=name)
    dist.barrier()  # every rank's part is uploaded
    if dist.get_rank() == 0:
        path = Path(ray.train.get_context().get_storage().experiment_fs_path) / name
        record = out_dir / LAST_CHECKPOINT
        record.with_suffix(".tmp").write_text(json.dumps({"step": state["step"], "path": str(path)}))
        record.with_suffix(".tmp").replace(record)
    dist.barrier()


def restore(engine: TrainEngine, out_dir: Path) -> Optional[dict]:
    """All ranks: load the newest checkpoint of this run, if any (Ray Train's latest or the one
    recorded in `out_dir`, whichever has the later step); returns the recipe's state."""
    folders = [Path(json.loads((out_dir / LAST_CHECKPOINT).read_text())["path"])] if (
        out_dir / LAST_CHECKPOINT).exists() else []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        folders.append(Path(checkpoint.path))  # run storage is a local (or shared) folder
    if not folders:
        return None
    folder = max(folders, key=lambda f: json.loads((f / "trainer_state.json").read_text())["step"])
    engine.load(folder)
    return json.loads((folder / "trainer_state.json").read_text())


def _step(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return float("inf")


class MetricsLog:
    """Rank 0's per-step metrics: a JSONL file, TensorBoard events, and a progress line with ETA.

    On resume the JSONL is cut back to the checkpoint's step, so each step appears once.
    """

    def __init__(self, folder: Path, total_steps: int, start_step: int = 0, print_every: int = 10,
                 prefix: str = "train"):
        from torch.utils.tensorboard import SummaryWriter

        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "metrics.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step(line) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tensorboard = SummaryWriter(str(folder / "tensorboard"), purge_step=start_step + 1)
        self.total_steps, self.start_step = total_steps, start_step
        self.print_every, self.prefix = print_every, prefix
        self.started = time.monotonic()

    def log(self, step: int, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for key, value in metrics.items():
            self.tensorboard.add_scalar(f"{self.prefix}/{key}", value, step)
        if step % self.print_every == 0 or step == self.total_steps:
            done = step - self.start_step
            eta = (time.monotonic() - self.started) / done * (self.total_steps - step)
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(f"{self.prefix} step {step}/{self.total_steps} {shown} eta {eta / 60:.1f} min", flush=True)

    def close(self) -> None:
        self.tensorboard.close()
