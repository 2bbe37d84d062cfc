"""Playing a set of episodes as a step of a run (rollout_workers/play.py)."""
import json

from omegaconf import OmegaConf

import rollout_workers.play
from rollout_workers import Acting, evaluate
from tests.conftest import run_driver


def test_a_finished_evaluation_starts_nothing_again(tiny_model, tmp_path, monkeypatch):
    """Resuming past a finished set of episodes starts no policy server or workers (a vLLM
    start-up is most of a minute on CPU)."""
    run_dir = tmp_path / "eval"
    run_driver(f"run_dir={run_dir}", "mode=eval", f"policy.model={tiny_model}", "eval.num_games=2", "env.max_steps=2",
               "policy.max_new_tokens=6", "rollout.num_workers=1", "rollout.envs_per_worker=2")
    report = json.loads((run_dir / "eval.json").read_text())

    def start_nothing(*args, **kwargs):
        raise AssertionError("started servers for a finished set of episodes")
    monkeypatch.setattr(rollout_workers.play, "play_missing", start_nothing)
    again = evaluate(OmegaConf.load(run_dir / "config.yaml"), Acting("llm", tiny_model), run_dir)
    assert again["episodes"] == report["episodes"] == 2
    assert again["success_rate"] == report["success_rate"]
