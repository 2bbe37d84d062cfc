"""Supervised fine-tuning of the policy on (prompt, response) pairs: π0 from expert demonstrations.

    train_sft(cfg, demos_parquet, base_model, out_dir)   # -> out_dir/policy, a Hugging Face folder

`sft_recipe` runs on every Ray Train worker and reads top to bottom: data, model, engine,
resume, the step loop (micro-batches, metrics, checkpoints), the final export.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray.train.torch
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from learners.data import collate, epoch_order, examples_from_steps, tokenize
from learners.engines import make_train_engine
from learners.trainer import MetricsLog, restore, run_on_ray_train, save_checkpoint


def train_sft(cfg, demos: Path, base_model: str, out_dir: Path) -> Path:
    """Fine-tune `base_model` on the demonstrations; returns the Hugging Face folder of π0."""
    loop_config = {
        "demos": str(demos.resolve()), "base_model": base_model, "out_dir": str(out_dir.resolve()),
        "seed": cfg.seed, "sft": OmegaConf.to_container(cfg.sft), "learner": OmegaConf.to_container(cfg.learner),
        "trust_remote_code": cfg.policy.trust_remote_code,
    }
    run_on_ray_train(sft_recipe, loop_config, cfg.learner, out_dir / "ray_train", name="sft")
    return out_dir / "policy"


def sft_recipe(config: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft, learner = config["sft"], config["learner"]
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(config["seed"])
    torch.set_num_threads(max(1, learner["torch_threads"] or int(learner["num_cpus_per_worker"])))
    out_dir = Path(config["out_dir"])

    # Data: every worker tokenizes the same list; each takes its slice of every batch.
    tokenizer = AutoTokenizer.from_pretrained(config["base_model"], trust_remote_code=config["trust_remote_code"])
    examples = [tokenize(tokenizer, e) for e in examples_from_steps(pq.read_table(config["demos"]))]
    dropped = sum(len(e.input_ids) > sft["max_seq_len"] for e in examples)
    examples = [e for e in examples if len(e.input_ids) <= sft["max_seq_len"]]
    if not examples:
        raise ValueError(f"no demonstration fits in sft.max_seq_len={sft['max_seq_len']} tokens ({dropped} dropped)")
    per_step = sft["batch_size"]
    accumulation = per_step // (world * sft["micro_batch_size"])
    total_steps = max(1, math.floor(sft["epochs"] * len(examples) / per_step))
    total_steps = min(total_steps, sft["max_steps"] or total_steps)

    device = ray.train.torch.get_device()  # cuda:<local rank> on GPU workers, else cpu
    model = AutoModelForCausalLM.from_pretrained(config["base_model"], dtype=torch.float32,
                                                 trust_remote_code=config["trust_remote_code"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=sft["lr"], weight_decay=sft["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(sft["warmup_steps"], total_steps))
    engine = make_train_engine(learner["backend"], model, optimizer, scheduler, sft["micro_batch_size"],
                               accumulation, learner["zero_stage"], sft["grad_clip"], learner["dtype"])
    state = restore(engine)
    start_step = state["step"] if state else 0
    log = None
    if rank == 0:
        print(f"sft: {len(examples)} examples ({dropped} longer than {sft['max_seq_len']} tokens dropped), "
              f"{total_steps} steps of {per_step}, {world} workers x {accumulation} micro-batches of "
              f"{sft['micro_batch_size']}" + (f", resuming after step {start_step}" if state else ""), flush=True)
        log = MetricsLog(out_dir, total_steps, start_step, prefix="sft")

    engine.module.train()
    for step in range(start_step + 1, total_steps + 1):
        if learner["fail_at_step"] == step and state is None:
            raise RuntimeError(f"injected failure at step {step} (learner.fail_at_step)")
        started, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        batch = step_batch(examples, step, per_step, config["seed"])
        mine = batch[rank::world]
        loss_sum = torch.zeros(2, device=device)  # (sum of micro-batch losses, tokens seen), over ranks below
        for i in range(0, len(mine), sft["micro_batch_size"]):
            micro = mine[i:i + sft["micro_batch_size"]]
            inputs = {k: v.to(device) for k, v in collate(micro, tokenizer.pad_token_id or tokenizer.eos_token_id).items()}
            loss = engine(**inputs).loss  # mean over the micro-batch's response tokens
            engine.backward(loss)
            engine.step()
            loss_sum += torch.stack([loss.detach(), inputs["attention_mask"].sum().float()])
        dist.all_reduce(loss_sum)
        metrics = {"loss": loss_sum[0].item() / (accumulation * world), "lr": lr,
                   "tokens_per_s": loss_sum[1].item() / (time.perf_counter() - started)}
        if log:
            log.log(step, metrics)
        if step % sft["checkpoint_every"] == 0 or step == total_steps:
            save_checkpoint(engine, {"step": step}, metrics)

    weights = engine.export_state_dict()  # all ranks take part; the full weights land on rank 0
    if rank == 0:
        export_hf(engine.module, weights, tokenizer, out_dir / "policy")
        log.close()


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
    """A Hugging Face folder (safetensors + tokenizer), written whole or not at all."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(partial, folder)
