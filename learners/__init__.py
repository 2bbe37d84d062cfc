"""Learners on Ray Train: each worker drives a DeepSpeed engine (or plain DDP, the baseline).

    policy_dir = train_sft(cfg, demos_parquet, base_model, out_dir)   # π0, a Hugging Face folder

`sft.py` is the SFT recipe; `trainer.py` the Ray Train job, checkpoints and metrics shared by
the learners; `engines.py` the DeepSpeed and DDP engines; `data.py` tokenization and loss masks.
"""
from learners.data import IGNORE, SFTExample, TokenizedExample, collate, examples_from_steps, tokenize
from learners.sft import train_sft

__all__ = ["train_sft", "SFTExample", "TokenizedExample", "IGNORE", "examples_from_steps", "tokenize", "collate"]
