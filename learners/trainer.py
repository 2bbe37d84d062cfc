"""Ray Train plumbing shared by the learners: the job, checkpoints, metrics.

A recipe is a plain function run on every Ray Train worker (`TorchTrainer`), which has set
up torch.distributed (gloo on CPU, NCCL on GPU) before it starts. Checkpoints go through
`ray.train.report`: every rank writes its shard into a local folder and Ray merges them in
the run's storage; after a worker failure (up to `learner.max_failures`), or when the same
command runs again, `restore` puts the engine back at the last checkpoint.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import ray.train
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from learners.engines import TrainEngine


def run_on_ray_train(recipe: Callable[[dict], None], loop_config: dict, learner_cfg, storage: Path,
                     name: str) -> None:
    """Run `recipe(loop_config)` on `learner.num_workers` workers; raises if the job fails."""
    trainer = TorchTrainer(
        recipe, train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=learner_cfg.num_workers, use_gpu=learner_cfg.use_gpu,
            resources_per_worker={"CPU": learner_cfg.num_cpus_per_worker, **learner_cfg.resources_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage.resolve()),
                             failure_config=FailureConfig(max_failures=learner_cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),  # each holds optimizer states
    )
    trainer.fit()  # raises when the job fails (after learner.max_failures restarts)


def save_checkpoint(engine: TrainEngine, state: dict, metrics: dict) -> None:
    """All ranks: the engine's state plus the recipe's `state` (rank 0) become one checkpoint."""
    with tempfile.TemporaryDirectory() as folder:
        engine.save(Path(folder))
        if dist.get_rank() == 0:
            (Path(folder) / "trainer_state.json").write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def restore(engine: TrainEngine) -> Optional[dict]:
    """All ranks: load the last checkpoint of this run, if any; returns the recipe's state."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        engine.load(Path(folder))
        return json.loads((Path(folder) / "trainer_state.json").read_text())


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
