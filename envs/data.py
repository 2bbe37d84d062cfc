"""ALFWorld games on disk: where they are, which splits exist, what task each game is.

Layout (what `alfworld-download` writes, and what the shipped archive unpacks to):
    $ALFWORLD_DATA/json_2.1.1/{train,valid_train,valid_seen,valid_unseen}/<task>/<trial>/game.tw-pddl
Games are filtered exactly as alfworld's AlfredTWEnv does, and returned sorted.

An archive is unpacked into a cache folder named after its content (sha256): another
archive, or a changed one, gets a folder of its own and is never read from an old one.
Without $ALFWORLD_DATA and without the archive, set-up (`python -m envs.data --prepare`) runs
`alfworld-download` into <cache>/alfworld-download, where every later run finds the games.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from paths import GAMES_ARCHIVE, REPO_ROOT, cache_dir

SPLIT_DIRS = {
    "train": "train",  # the paper's training games (3,553 in the full data set)
    "train_held_out": "valid_train",  # train-distribution games held out of `train` (200)
    "eval_in_distribution": "valid_seen",
    "eval_out_of_distribution": "valid_unseen",
}
# alfworld's task-type names -> the short names used in reports (METHOD.md's six types).
TASK_TYPES = {
    "pick_and_place_simple": "pick",
    "look_at_obj_in_light": "look",
    "pick_clean_then_place_in_recep": "clean",
    "pick_heat_then_place_in_recep": "heat",
    "pick_cool_then_place_in_recep": "cool",
    "pick_two_obj_and_place": "pick_two",
}


class DataError(RuntimeError):
    """The games are missing or malformed; the message says what to do."""


@dataclass(frozen=True)
class Game:
    game_id: str  # "<task folder>/<trial folder>", unique within a split
    path: str  # the game.tw-pddl file
    task_type: str  # one of TASK_TYPES' short names


def downloaded_root() -> Path:
    """Where set-up downloads the games when there is neither $ALFWORLD_DATA nor the archive."""
    return cache_dir() / "alfworld-download"


def archive_file(archive: str) -> Path:
    """`data.archive` as a path (relative ones from the repository's root)."""
    return Path(archive) if Path(archive).is_absolute() else REPO_ROOT / archive


def resolve_data_root(archive: str, check_only: bool = False) -> Path:
    """The ALFWorld data folder: $ALFWORLD_DATA, else the archive unpacked once into the cache
    (`alfworld-data-<first 16 hex digits of the archive's sha256>`), else the games set-up
    downloaded (`downloaded_root`)."""
    if os.environ.get("ALFWORLD_DATA"):
        root = Path(os.environ["ALFWORLD_DATA"]).expanduser()
        if not (root / "json_2.1.1").is_dir():
            raise DataError(f"ALFWORLD_DATA={root} has no json_2.1.1/ folder: run `alfworld-download` or unset it")
        return root
    archive_path = archive_file(archive)
    if not archive_path.is_file():
        if (downloaded_root() / "json_2.1.1").is_dir():
            return downloaded_root()
        raise DataError(
            f"no ALFWorld games: set $ALFWORLD_DATA (fill it with `alfworld-download`), point data.archive "
            f"at the games archive (not found: {archive_path}), or run scripts/setup.sh on a connected machine "
            f"(it downloads them)"
        )
    root = cache_dir() / f"alfworld-data-{archive_digest(archive_path)[:16]}"
    if (root / "json_2.1.1").is_dir() or check_only:
        return root
    tmp = root.with_name(root.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive_path) as tar:
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"the games archive {archive_path} cannot be unpacked ({type(e).__name__}: {e})") from None
    inner = tmp / "alfworld-data"  # the archive holds one top folder
    data = inner if inner.is_dir() else tmp
    if not (data / "json_2.1.1").is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"the games archive {archive_path} holds no json_2.1.1/ folder")
    try:
        data.rename(root)
    except OSError:  # another process unpacked the same archive first
        if not (root / "json_2.1.1").is_dir():
            raise
    shutil.rmtree(tmp, ignore_errors=True)
    return root


def prepare(archive: str) -> Path:
    """Set-up's step: the games on disk. With neither $ALFWORLD_DATA nor the archive, nor an
    earlier download, `alfworld-download` fills `downloaded_root()` first (a connected machine)."""
    if not (os.environ.get("ALFWORLD_DATA") or archive_file(archive).is_file()
            or (downloaded_root() / "json_2.1.1").is_dir()):
        download_games(downloaded_root())
    return resolve_data_root(archive)


def alfworld_download_command() -> list[str]:
    """alfworld's downloader, from this Python's environment (alfworld installs it there)."""
    beside = Path(sys.executable).parent / "alfworld-download"
    return [str(beside) if beside.is_file() else "alfworld-download"]


def download_games(dest: Path) -> None:
    """`alfworld-download` into `dest`, through a partial folder: an interrupted download
    leaves no folder that looks complete."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted download left
    print(f"alfworld: no games on this machine; downloading them into {dest} (alfworld-download)", flush=True)
    try:
        done = subprocess.run([*alfworld_download_command(), "--data-dir", str(tmp)], timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"alfworld-download did not run ({type(e).__name__}: {e}): set $ALFWORLD_DATA or "
                        "data.archive instead") from None
    if done.returncode != 0 or not (tmp / "json_2.1.1").is_dir():
        raise DataError(f"alfworld-download failed (exit {done.returncode}; no json_2.1.1/ in {tmp}): "
                        "set $ALFWORLD_DATA or data.archive instead")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def data_fingerprint(root: Path) -> str:
    """16 hex digits that name a data folder: an unpacked archive's digest, else a hash of
    the folder's path ($ALFWORLD_DATA)."""
    prefix = "alfworld-data-"
    if root.name.startswith(prefix) and root.parent == cache_dir():
        return root.name[len(prefix):]
    return hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]


def archive_digest(path: Path) -> str:
    """sha256 of a file (the 10 MB games archive hashes in a few tens of milliseconds)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_games(split: str, root: Path) -> list[Game]:
    """The split's solvable games, sorted by id (alfworld returns them in file-system order)."""
    if split not in SPLIT_DIRS:
        raise DataError(f"unknown split {split!r}: expected one of {', '.join(SPLIT_DIRS)}")
    split_dir = root / "json_2.1.1" / SPLIT_DIRS[split]
    if not split_dir.is_dir():
        raise DataError(f"split {split} is missing: {split_dir} does not exist")
    games = []
    for traj in sorted(split_dir.glob("*/*/traj_data.json")):
        trial = traj.parent
        if "movable" in str(trial) or "Sliced" in str(trial):
            continue  # alfworld does not support these
        game_file = trial / "game.tw-pddl"
        if not game_file.is_file():
            continue
        task_type = json.loads(traj.read_text())["task_type"]
        if task_type not in TASK_TYPES or not json.loads(game_file.read_text()).get("solvable", False):
            continue
        games.append(Game(f"{trial.parent.name}/{trial.name}", str(game_file), TASK_TYPES[task_type]))
    if not games:
        raise DataError(f"split {split} has no playable games under {split_dir}")
    return games


def pick_games(games: list[Game], num_games: int | None) -> list[Game]:
    """`num_games` of the games (all if None), the task types in their shares of the split.

    The sorted list is grouped by task type, so its first games are all of one or two types.
    Here each type's games come in a fixed pseudo-random order (crc32 of the id) and the
    types are interleaved by share: every run picks the same games, whatever its seed, and
    a smaller pick is part of a larger one. Returned sorted by id.
    """
    if num_games is None or num_games >= len(games):
        return games
    by_type: dict[str, list[Game]] = defaultdict(list)
    for game in games:
        by_type[game.task_type].append(game)
    order = []
    for task_type, group in by_type.items():
        group.sort(key=lambda g: zlib.crc32(g.game_id.encode()))
        order += [((i + 0.5) / len(group), task_type, game) for i, game in enumerate(group)]
    order.sort(key=lambda item: item[:2])
    return sorted((game for *_, game in order[:num_games]), key=lambda g: g.game_id)


if __name__ == "__main__":
    # `python -m envs.data --prepare`: unpack the games once and print the split sizes.
    if sys.argv[1:] != ["--prepare"]:
        sys.exit("usage: python -m envs.data --prepare")
    data_root = prepare(GAMES_ARCHIVE)
    for name in SPLIT_DIRS:
        print(f"alfworld {name}: {len(list_games(name, data_root))} games in {data_root}")
