"""Shared fixtures: a tiny random model (built offline in seconds), real games, a local Ray."""
from __future__ import annotations

import os
import subprocess
import sys

# Before anything imports ray: local tests run on loopback, without token auth or telemetry.
os.environ.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                   "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1",
                   "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"})

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from paths import REPO_ROOT  # noqa: E402
from envs import list_games, resolve_data_root  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A random-initialised 2-layer Llama with a byte-level BPE tokenizer and a ChatML template.

    Head size 32: the smallest that vLLM's CPU attention supports.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["You arrive at shelf 1. On the shelf 1, you see a keychain 3, and a pen 3.",
              "Your task is to: put a clean mug in coffeemachine.", "ACTION: go to countertop 2",
              "REASON: the mug may be in the cabinet.", "Admissible commands: look, inventory, examine desk 1"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                         initializer_range=0.5)  # large weights: seeds give visibly different outputs
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def small_cfg(**overrides):
    """The default config with `key=value` overrides (dotted keys), as the driver would build it."""
    from omegaconf import OmegaConf

    from configs.schema import Config

    cfg = OmegaConf.structured(Config)
    # The transformers engine unless a test asks for vLLM: tests/test_vllm.py runs that one.
    cfg.merge_with(OmegaConf.from_dotlist([f"{k}={v}" for k, v in {"policy.engine": "hf", **overrides}.items()]))
    return cfg


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_prm(tiny_model, tmp_path_factory) -> str:
    """The tiny policy's backbone with a fresh scalar head, saved as a PRM folder."""
    from models.prm import load_prm

    model, tokenizer = load_prm(tiny_model, new_head=True)
    folder = tmp_path_factory.mktemp("tiny-prm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def data_root() -> Path:
    from configs.schema import DataConfig

    return resolve_data_root(DataConfig().archive)


@pytest.fixture(scope="session")
def ood_games(data_root):
    return list_games("eval_out_of_distribution", data_root)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (tests never `ray stop`: it kills every Ray process)."""
    import ray

    # With a dashboard, as the driver's local Ray: Ray Train's placement-group cleaner asks the
    # dashboard of its cluster whether the trainer lives, and a cluster without one points at
    # 127.0.0.1:8265, which may be another cluster's.
    ray.init(address="local", num_cpus=4, object_store_memory=500 * 2**20, include_dashboard=True,
             dashboard_host="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


def run_driver(*args):
    """The driver in a process of its own; demonstrations go to a store beside the run, not
    into the user's cache."""
    run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("run_dir="))
    defaults = {"demos.store": f"{run_dir}-demonstrations",  # beside the run
                "policy.engine": "hf"}  # the tests' reference engine; tests/test_vllm.py runs vLLM's
    given = {a.split("=", 1)[0] for a in args}
    extra = [f"{k}={v}" for k, v in defaults.items() if k not in given]
    proc = subprocess.run([sys.executable, "driver.py", *args, *extra], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
