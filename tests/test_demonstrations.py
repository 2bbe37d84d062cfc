"""The demonstration store: the expert plays each game once, later runs reuse its episodes."""
import json

import pyarrow.parquet as pq
import pytest

import rollout_workers.play
from configs import load_config
from envs import DataError
from rollout_workers.demonstrations import collect_demos, demonstration_store
from tests.conftest import run_driver


def test_a_second_run_reuses_the_stored_demonstrations_without_playing(tiny_model, data_root, tmp_path,
                                                                       monkeypatch):
    stores = str(tmp_path / "stores")
    args = ["mode=demos", f"policy.model={tiny_model}", "demos.num_games=3", "env.max_steps=30",
            "rollout.num_workers=1", "rollout.envs_per_worker=3", f"demos.store={stores}"]
    run_driver(f"run_dir={tmp_path / 'first'}", *args)
    first = pq.read_table(tmp_path / "first" / "demos.parquet")
    store = demonstration_store(data_root, "train", 30, stores)
    assert len(list(store.glob("*.parquet"))) == 3 and first.num_rows > 3

    def play_nothing(*a, **k):
        raise AssertionError("played a game that the store holds")
    monkeypatch.setattr(rollout_workers.play, "play_missing", play_nothing)
    (tmp_path / "second").mkdir()
    report = collect_demos(load_config(args), tmp_path / "second")
    assert pq.read_table(tmp_path / "second" / "demos.parquet").equals(first)
    smaller = collect_demos(load_config([*args, "demos.num_games=2"]), tmp_path / "second")
    assert smaller["games"] == 2 and report["games"] == 3  # a subset of the games plays none either

    # Another step limit is another store; a store that names something else is refused.
    assert demonstration_store(data_root, "train", 20, stores) != store
    record = store.parent / "store.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "max_steps": 10}))
    with pytest.raises(DataError, match="holds .* not"):
        demonstration_store(data_root, "train", 30, stores)
