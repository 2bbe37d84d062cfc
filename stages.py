"""Resumable stages: a run directory remembers which stages finished and how long each took.

A stage is skipped when its manifest exists; one stopped midway has none, and runs again,
continuing from its own episode shards or checkpoints. Its wall time sums every run that
worked on it (`stage_clock`), so a resumed run's summary still says what each stage cost.
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator


def stage(folder: Path, name: str, run: Callable[[], dict]) -> dict:
    """Run a stage unless its manifest says it finished. The manifest (folder/manifest.json)
    is written last, with the stage's result and wall time: a stage stopped midway has none,
    and runs again (continuing from its own episode shards or checkpoints). The wall time
    sums every run that worked on the stage (`stage_clock`)."""
    manifest = folder / "manifest.json"
    if manifest.exists():
        return json.loads(manifest.read_text())["result"]
    folder.mkdir(parents=True, exist_ok=True)
    with stage_clock(folder / "stage_time.json") as elapsed:
        result = run()
    write_json(manifest, {"stage": name, "wall_time_s": round(elapsed(), 1),
                          "finished": datetime.now().isoformat(timespec="seconds"), "result": result})
    return result


def stage_walls(run_dir: Path) -> dict[str, float]:
    """Seconds each finished stage of a run took (summed over resumes), in the order they
    finished: the manifests', and the reports' of the demonstrations and π0's evaluations."""
    records = list(run_dir.rglob("manifest.json")) + [
        p for p in (run_dir / "demos.json", *run_dir.glob("eval_sft_*.json")) if p.exists()]
    walls = {}
    for path in sorted(records, key=lambda p: p.stat().st_mtime_ns):
        record = json.loads(path.read_text())
        name = str(path.parent.relative_to(run_dir)) if path.name == "manifest.json" else path.stem
        walls[name] = record["wall_time_s"]
    return walls


def write_json(path: Path, record: dict) -> None:
    """Written whole, then renamed: a kill midway leaves the old file (or none), never half of one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


@contextmanager
def stage_clock(path: Path, every_s: float = 30.0) -> Iterator[Callable[[], float]]:
    """Time resumable work (a stage, a set of episodes) across runs: the seconds so far live in
    `path`, rewritten every `every_s` (a run killed midway loses at most that) and at the end.
    Yields the total, which stops growing when the block ends (what follows, such as shutting
    servers down, is not the work's time)."""
    before = json.loads(path.read_text())["seconds"] if path.exists() else 0.0
    start = time.monotonic()
    end: float | None = None

    def elapsed() -> float:
        return before + (time.monotonic() if end is None else end) - start

    def save() -> None:
        write_json(path, {"seconds": round(elapsed(), 1)})

    def tick() -> None:
        while not done.wait(every_s):
            save()

    done = threading.Event()
    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield elapsed
    finally:
        done.set()
        ticker.join()
        end = time.monotonic()
        save()


