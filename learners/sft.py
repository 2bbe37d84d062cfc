"""Supervised fine-tuning of the policy on (prompt, response) pairs: π0 from expert demonstrations.

    train_sft(cfg, demos_parquet, base_model, out_dir)   # -> out_dir/policy, a Hugging Face folder

`sft_recipe` runs on every Ray Train worker and reads top to bottom: data, model, engine,
the step loop (`trainer.train_steps`: micro-batches, metrics, checkpoints, resume), export.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from learners.data import collate, examples_from_steps, response_nll, tokenize
from learners.trainer import (build_engine, count_steps, export_hf, init_worker, run_recipe, train_steps,
                              worker_share)


def train_sft(cfg, demos: Path, base_model: str, out_dir: Path) -> Path:
    """Fine-tune `base_model` on the demonstrations; returns the Hugging Face folder of π0."""
    run_recipe(sft_recipe, cfg, "sft", out_dir, demos=str(demos.resolve()), base_model=base_model)
    return out_dir / "policy"


def sft_recipe(config: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft, learner = config["train"], config["learner"]
    device = init_worker(config["seed"], learner)
    out_dir = Path(config["out_dir"])

    # Data: every worker tokenizes the same list; each takes its slice of every batch.
    tokenizer = AutoTokenizer.from_pretrained(config["base_model"], trust_remote_code=config["trust_remote_code"])
    examples = [tokenize(tokenizer, e) for e in examples_from_steps(pq.read_table(config["demos"]))]
    dropped = sum(len(e.input_ids) > sft["max_seq_len"] for e in examples)
    examples = [e for e in examples if len(e.input_ids) <= sft["max_seq_len"]]
    if not examples:
        raise ValueError(f"no demonstration fits in sft.max_seq_len={sft['max_seq_len']} tokens ({dropped} dropped)")
    total_steps = count_steps(sft, len(examples))
    if dist.get_rank() == 0:
        print(f"sft: {len(examples)} examples ({dropped} longer than {sft['max_seq_len']} tokens dropped), "
              f"{total_steps} steps of {sft['batch_size']} on {dist.get_world_size()} workers", flush=True)

    model = AutoModelForCausalLM.from_pretrained(config["base_model"], dtype=torch.float32,
                                                 trust_remote_code=config["trust_remote_code"]).to(device)
    engine, optimizer = build_engine(model, sft, learner, total_steps)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def micro_loss(micro: list) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = {k: v.to(device) for k, v in collate(micro, pad_id).items()}
        loss = response_nll(engine, inputs)  # mean over the micro-batch's response tokens
        return loss, {"loss": loss.item(), "tokens": inputs["attention_mask"].sum().item()}

    share = worker_share(examples, sft["batch_size"], config["seed"], length=lambda e: len(e.input_ids))
    train_steps(engine, optimizer, share, micro_loss, sft, learner, total_steps, out_dir, "sft")
    weights = engine.export_state_dict()  # all ranks take part; the full weights land on rank 0
    if dist.get_rank() == 0:
        export_hf(engine.module, weights, tokenizer, out_dir / "policy")
