"""A training checkpoint of a policy learner as a Hugging Face folder, to evaluate or serve it.

    python -m learners.export RUN_DIR/sft/ray_train/sft/checkpoint_step_<step> BASE_MODEL OUT_DIR

The learners write DeepSpeed checkpoints (`trainer.save_checkpoint`) every
`checkpoint_every` steps (`RUN_DIR/sft/last_checkpoint.json` names the newest); the finished
stage exports its policy itself. This exports one written midway (say, to evaluate a run that has not finished): DeepSpeed's own
`get_fp32_state_dict_from_zero_checkpoint` gathers the ZeRO shards, and the weights go into
`BASE_MODEL`'s architecture with its tokenizer. DeepSpeed checkpoints are torch pickles:
export only checkpoints your own runs wrote.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from learners.trainer import export_hf


def export_checkpoint(checkpoint: Path, base_model: str, out: Path) -> dict:
    """Write `out` (safetensors + tokenizer) from the checkpoint; returns its trainer state."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="deepspeed")
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    model.load_state_dict(weights)
    export_hf(model, model.state_dict(), AutoTokenizer.from_pretrained(base_model), out)
    return state


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m learners.export CHECKPOINT_DIR BASE_MODEL OUT_DIR")
    from policy_server import resolve_model

    trainer_state = export_checkpoint(Path(sys.argv[1]), resolve_model(sys.argv[2]), Path(sys.argv[3]))
    print(f"exported the checkpoint of step {trainer_state['step']} to {sys.argv[3]}")
