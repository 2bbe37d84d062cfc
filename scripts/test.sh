#!/usr/bin/env bash
# Sets up and runs every test in .venv, vLLM's included (they fail rather than skip if vLLM
# is missing). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
AGENTPRM_REQUIRE_VLLM=1 .venv/bin/python -m pytest "$@"
