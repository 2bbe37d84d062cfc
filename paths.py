"""Where the project and its cache are on disk: the bottom layer, which every package may
import (the games and models modules among them, which `configs` itself imports to check
a config's files)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
# ALFWorld's full data set as one archive, relative to REPO_ROOT (data.archive's default).
GAMES_ARCHIVE = "../shared/alfworld/alfworld-data-json_2.1.1-full.tar.xz"


def cache_dir() -> Path:
    """Where unpacked games and converted models live: $AGENTPRM_CACHE, else ~/.cache/agentprm."""
    return Path(os.environ.get("AGENTPRM_CACHE", "~/.cache/agentprm")).expanduser()
