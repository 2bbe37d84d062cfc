"""Resumable stages: the stage clock."""
import json

import stages


def test_stage_clock_stops_when_its_work_ends(tmp_path, monkeypatch):
    """The total adds this run's time to the saved one and stops at the end of the block: a
    report read after the servers shut down does not count their shutdown."""
    now = [100.0]
    monkeypatch.setattr(stages.time, "monotonic", lambda: now[0])
    path = tmp_path / "clock.json"
    path.write_text(json.dumps({"seconds": 5.0}))
    with stages.stage_clock(path) as elapsed:
        now[0] += 3.0
        assert elapsed() == 8.0
    now[0] += 40.0
    assert elapsed() == 8.0 and json.loads(path.read_text())["seconds"] == 8.0
