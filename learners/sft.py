"""Supervised fine-tuning of the policy on whole episodes: π0 from expert demonstrations.

    train_sft(cfg, demos_parquet, base_model, out_dir)   # -> out_dir/policy, a Hugging Face folder

Each demonstration is one token sequence, as the policy would hold it while playing
(`prompt.state`), with the loss on the assistant turns; a micro-batch packs
`sft.micro_batch_size` of them in one row. `sft_recipe` runs on every Ray Train worker and
reads top to bottom: data, model, engine, the step loop (`trainer.train_steps`:
micro-batches, metrics, checkpoints, resume), export.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from agent.episode import ChatFormat
from learners.data import episode_sequences, pack, response_nll
from learners.trainer import (build_engine, count_steps, export_hf, init_worker, run_recipe, train_steps,
                              worker_share)


def train_sft(cfg, demos: Path, base_model: str, out_dir: Path) -> Path:
    """Fine-tune `base_model` on the demonstrations; returns the Hugging Face folder of π0."""
    from omegaconf import OmegaConf

    run_recipe(sft_recipe, cfg, "sft", out_dir, demos=str(demos.resolve()), base_model=base_model,
               prompt=OmegaConf.to_container(cfg.prompt), max_new_tokens=cfg.policy.max_new_tokens)
    return out_dir / "policy"


def sft_recipe(config: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft, learner = config["train"], config["learner"]
    device = init_worker(config["seed"], learner)
    out_dir = Path(config["out_dir"])

    # Data: every worker builds the same sequences; each takes its slice of every batch.
    tokenizer = AutoTokenizer.from_pretrained(config["base_model"], trust_remote_code=config["trust_remote_code"])
    examples, restarts = episode_sequences(pq.read_table(config["demos"]), ChatFormat(tokenizer), config["prompt"],
                                           config["max_new_tokens"])
    dropped = sum(len(e.input_ids) > sft["max_seq_len"] for e in examples)
    examples = [e for e in examples if len(e.input_ids) <= sft["max_seq_len"]]
    if not examples:
        raise ValueError(f"no demonstration fits in sft.max_seq_len={sft['max_seq_len']} tokens ({dropped} dropped)")
    total_steps = count_steps(sft, len(examples))
    if dist.get_rank() == 0:
        tokens = sum(len(e.input_ids) for e in examples)
        print(f"sft: {len(examples)} sequences of {config['prompt']['state']} state, {tokens} tokens "
              f"({tokens / len(examples):.0f} each; {restarts} context-rule restarts; {dropped} longer than "
              f"{sft['max_seq_len']} tokens dropped), {total_steps} steps of {sft['batch_size']} on "
              f"{dist.get_world_size()} workers", flush=True)

    model = AutoModelForCausalLM.from_pretrained(config["base_model"], dtype=torch.float32,
                                                 trust_remote_code=config["trust_remote_code"]).to(device)
    engine, optimizer = build_engine(model, sft, learner, total_steps)

    def micro_loss(micro: list) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = {k: v.to(device) for k, v in pack(micro).items()}
        loss = response_nll(engine, inputs)  # mean over the micro-batch's response tokens
        return loss, {"loss": loss.item(), "tokens": inputs["input_ids"].numel()}

    share = worker_share(examples, sft["batch_size"], config["seed"], length=lambda e: len(e.input_ids))
    train_steps(engine, optimizer, share, micro_loss, sft, learner, total_steps, out_dir, "sft")
    weights = engine.export_state_dict()  # all ranks take part; the full weights land on rank 0
    if dist.get_rank() == 0:
        export_hf(engine.module, weights, tokenizer, out_dir / "policy")
