"""The driver end to end on a tiny model: every mode in a process of its own, and its resume."""
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from configs import REPO_ROOT
from rollout_workers import SCHEMA, demonstrated_commands, reset_steps
from tests.conftest import run_driver


def test_eval_mode_writes_report_and_resumes(tiny_model, tmp_path):
    run_dir = tmp_path / "eval"
    args = [f"run_dir={run_dir}", "mode=eval", f"policy.model={tiny_model}", "eval.num_games=3", "env.max_steps=3",
            "policy.max_new_tokens=6", "rollout.num_workers=1", "rollout.envs_per_worker=3", "seed=7"]
    proc = run_driver(*args)
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["episodes"] == 3 and report["games"] == 3 and report["max_steps"] == 3 and report["seed"] == 7
    assert report["mean_steps"] == 3 and report["split"] == "eval_out_of_distribution"
    assert "all" in proc.stdout and "wall time" in proc.stdout
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.seed == 7 and saved.policy.model == tiny_model
    shards = sorted((run_dir / "eval").glob("*.parquet"))
    assert len(shards) == 3
    # Re-running the same command resumes: episodes on disk are not played again.
    mtimes = [p.stat().st_mtime_ns for p in shards]
    shards[0].unlink()
    run_driver(*args)
    assert [p.stat().st_mtime_ns for p in sorted((run_dir / "eval").glob("*.parquet"))][1:] == mtimes[1:]
    resumed = json.loads((run_dir / "eval.json").read_text())
    assert resumed["episodes"] == 3
    assert resumed["wall_time_s"] > report["wall_time_s"]  # both runs' playing time


def test_demos_mode_keeps_the_experts_winning_episodes(tiny_model, tmp_path):
    run_dir = tmp_path / "demos"
    run_driver(f"run_dir={run_dir}", "mode=demos", "demos.num_games=3", "env.max_steps=12",
               f"policy.model={tiny_model}", "rollout.num_workers=1", "rollout.envs_per_worker=3")
    report = json.loads((run_dir / "demos.json").read_text())
    demos = pq.read_table(run_dir / "demos.parquet")
    assert demos.schema == SCHEMA
    episodes = set(demos["episode_id"].to_pylist())
    assert len(episodes) == report["demo_episodes"] and demos.num_rows == report["demo_steps"]
    assert report["split"] == "train" and report["episodes"] == 3
    # with a 12-step limit an expert episode may lose: losing episodes are not demonstrations
    assert 0 < len(episodes) <= 3
    won = {r["episode_id"] for r in demos.to_pylist() if r["won"]}
    assert won == episodes
    assert all(r.startswith("ACTION: ") for r in demos["response"].to_pylist())


def test_sft_mode_runs_demos_training_and_evaluation_and_resumes(tiny_model, tmp_path):
    run_dir = tmp_path / "sft"
    args = [f"run_dir={run_dir}", "mode=sft", f"policy.model={tiny_model}", "demos.num_games=2",
            "env.max_steps=20", "rollout.num_workers=1", "rollout.envs_per_worker=2", "policy.max_new_tokens=6",
            "learner.num_workers=2", "sft.batch_size=4", "sft.micro_batch_size=1", "sft.max_steps=2",
            "sft.epochs=8",  # 2 steps even if the expert won only one of the 2 games
            "sft.eval_splits=[eval_out_of_distribution,eval_in_distribution]", "eval.num_games=1"]
    proc = run_driver(*args)
    assert (run_dir / "demos.parquet").is_file() and (run_dir / "sft/policy/model.safetensors").is_file()
    assert len((run_dir / "sft/metrics.jsonl").read_text().splitlines()) == 2
    for split in ("eval_out_of_distribution", "eval_in_distribution"):
        report = json.loads((run_dir / f"eval_sft_{split}.json").read_text())
        assert report["split"] == split and report["model"] == str(run_dir / "sft/policy")
    assert "π0:" in proc.stdout and json.loads((run_dir / "sft/manifest.json").read_text())["wall_time_s"] > 0
    # The local Ray's dashboard answers Ray Train's placement-group cleaner (ray.dashboard).
    assert "Failed to query Ray Train Controller" not in proc.stdout + proc.stderr
    # Re-running resumes past every finished stage: no demonstrations, no training again.
    again = run_driver(*args)
    assert "π0:" not in again.stdout and "demonstrations:" not in again.stdout


def test_critic_mode_runs_rollouts_targets_prm_and_best_of_n_and_resumes(tiny_model, tmp_path):
    run_dir = tmp_path / "critic"
    args = [f"run_dir={run_dir}", "mode=critic", f"policy.model={tiny_model}", "critic.num_games=2",
            "critic.rollouts_per_game=2", "critic.val_fraction=0.4", "env.max_steps=3", "policy.max_new_tokens=6",
            "rollout.num_workers=1", "rollout.envs_per_worker=2", "learner.num_workers=2", "prm.batch_size=2",
            "prm.micro_batch_size=1", "prm.epochs=4", "prm.max_steps=2", "best_of_n.sizes=[1,2]",
            "eval.num_games=1"]
    proc = run_driver(*args)
    critic = run_dir / "critic"
    dataset = json.loads((critic / "dataset.json").read_text())
    assert dataset["episodes"] == 4 and dataset["transitions"] == 12 and dataset["rollouts"]["split"] == "train"
    assert sum(dataset["target_histogram"]["counts"]) == dataset["unique_state_actions"]
    assert pq.read_table(critic / "qtargets.parquet").num_rows == dataset["transitions"]  # one row per step
    assert (critic / "prm/model.safetensors").is_file() and (critic / "qtargets.png").is_file()
    assert json.loads((critic / "prm/config.json").read_text())["architectures"][0].endswith(
        "ForSequenceClassification")
    assert len((critic / "metrics.jsonl").read_text().splitlines()) == 2
    bon = json.loads((critic / "bon/bon.json").read_text())
    assert set(bon["success_rate"]) == {"1", "2"} and (critic / "bon/bon.png").is_file()
    for n in (1, 2):
        report = json.loads((critic / f"bon/bon_{n}.json").read_text())
        assert report["best_of_n"] == n and report["prm"] == str(critic / "prm")
        steps = pq.read_table(critic / f"bon/bon_{n}").to_pylist()
        assert all(1 <= s["candidates"] <= n and (s["prm_score"] is None) == (s["candidates"] == 1) for s in steps)
    first = proc.stdout + proc.stderr
    assert "stage 2: PRM" in first and "llm on train" in first and "episode sequences" in first
    # Re-running redoes nothing: no rollouts, no training (the PRM folder stays as it was).
    mtime = (critic / "prm/model.safetensors").stat().st_mtime_ns
    again = run_driver(*args)
    assert (critic / "prm/model.safetensors").stat().st_mtime_ns == mtime
    assert "llm on train" not in again.stdout + again.stderr and "episode sequences" not in again.stdout + again.stderr


def test_train_mode_iterates_and_resumes_where_stage_3_crashed(tiny_model, tmp_path):
    """Two AgentPRM iterations from a given π0. The learner fails at DPO step 3 of each
    iteration (after the step-2 checkpoint); each re-run resumes inside stage 3, without
    redoing the finished stages."""
    run_dir = tmp_path / "train"
    args = [f"run_dir={run_dir}", "mode=train", "iterations=2", f"init_policy={tiny_model}",
            f"policy.model={tiny_model}", "critic.num_games=2", "critic.rollouts_per_game=2", "critic.val_fraction=0.4",
            "env.max_steps=3", "policy.max_new_tokens=6", "rollout.num_workers=1", "rollout.envs_per_worker=2",
            "learner.num_workers=2", "learner.max_failures=0", "learner.fail_at_step=3",
            "prm.batch_size=2", "prm.micro_batch_size=1", "prm.max_steps=2",
            "dpo.batch_size=2", "dpo.micro_batch_size=1", "dpo.max_steps=4", "dpo.epochs=100", "dpo.checkpoint_every=2",
            "dpo.push_every=2", "dpo.max_new_tokens=6", "dpo.temperature=1.0", "eval.num_games=1",
            "dpo.monitor_games=1", "dpo.monitor_every=2", "policy.engine=hf"]
    crashed = subprocess.run([sys.executable, "driver.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=900)
    assert crashed.returncode != 0 and "injected failure at step 3" in crashed.stdout + crashed.stderr
    it1 = run_dir / "iter_1"
    assert (it1 / "critic/manifest.json").is_file() and (it1 / "critic/prm_stage/manifest.json").is_file()
    assert {p.name for p in (it1 / "critic/prm").iterdir()}.isdisjoint({"manifest.json", "stage_time.json"})
    assert not (it1 / "dpo/manifest.json").exists()
    assert len((it1 / "dpo/metrics.jsonl").read_text().splitlines()) >= 2
    crashed_dpo_s = json.loads((it1 / "dpo/stage_time.json").read_text())["seconds"]
    assert crashed_dpo_s > 0
    rollouts = sorted(p.stat().st_mtime_ns for p in (it1 / "critic/rollouts").glob("*.parquet"))
    prm_mtime = (it1 / "critic/prm/model.safetensors").stat().st_mtime_ns

    second = subprocess.run([sys.executable, "driver.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=900)
    out = second.stdout + second.stderr
    assert "dpo: resuming after step 2" in out and "injected failure at step 3" in out  # iteration 2's DPO
    assert sorted(p.stat().st_mtime_ns for p in (it1 / "critic/rollouts").glob("*.parquet")) == rollouts
    assert (it1 / "critic/prm/model.safetensors").stat().st_mtime_ns == prm_mtime  # not trained again
    dpo = [json.loads(line)["step"] for line in (it1 / "dpo/metrics.jsonl").read_text().splitlines()]
    assert dpo == [1, 2, 3, 4]
    # the stage's wall time counts the crashed run too
    assert json.loads((it1 / "dpo/manifest.json").read_text())["wall_time_s"] > crashed_dpo_s

    run_driver(*args)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["success_rate"]) == ["pi0", "pi1", "pi2"] and (run_dir / "success.png").is_file()
    for name in ("pi1", "pi2"):  # each paired with π0 on the same game
        versus = summary["paired_vs_pi0"][name]
        assert versus["games"] == 1 and versus["a_only"] + versus["b_only"] <= 1 and 0 <= versus["p_value"] <= 1
    walls = summary["stage_wall_s"]  # every stage, in the order they finished
    assert list(walls) == ["eval_pi0"] + [f"iter_{i}/{s}" for i in (1, 2)
                                          for s in ("critic", "critic/prm_stage", "dpo", "eval")]
    assert all(seconds > 0 for seconds in walls.values())
    for i in (1, 2):
        manifest = json.loads((run_dir / f"iter_{i}/dpo/manifest.json").read_text())
        assert manifest["result"]["policy"] == str(run_dir / f"iter_{i}/dpo/policy")
        assert json.loads((run_dir / f"iter_{i}/eval/eval.json").read_text())["model"] == manifest["result"]["policy"]
        monitor = manifest["result"]["monitor"]  # the final version is always measured
        assert monitor[-1]["version"] == max(r["version"] for r in monitor) and monitor[-1]["games"] == 1
        # iteration 1's stage resumed: its report keeps the crashed run's measurements, none twice
        logged = [json.loads(line) for line in (run_dir / f"iter_{i}/dpo/monitor.jsonl").read_text().splitlines()]
        assert monitor == logged and [r["version"] for r in monitor] == sorted({r["version"] for r in monitor})
        assert (run_dir / f"iter_{i}/dpo/monitor.png").is_file()


def test_inverseprm_runs_an_iteration_from_demonstrations_alone(tiny_model, tmp_path):
    """InversePRM end to end on a tiny model: demonstrations of 2 train games, then an
    iteration (transitions, the PRM, DPO, evaluation, Best-of-N before and after DPO), with
    the reset distribution and steered exploration on. (Iterations after the first: the
    AgentPRM test above.)"""
    demos_dir = tmp_path / "demos"
    run_driver(f"run_dir={demos_dir}", "mode=demos", "demos.num_games=2", f"policy.model={tiny_model}",
               "rollout.num_workers=1", "rollout.envs_per_worker=2")
    run_dir = tmp_path / "inverse"
    proc = run_driver(
        f"run_dir={run_dir}", "mode=train", "algorithm=inverseprm", "iterations=1", f"init_policy={tiny_model}",
        f"policy.model={tiny_model}", f"sft.demos={demos_dir / 'demos.parquet'}", "critic.num_games=2",
        "critic.rollouts_per_game=2", "critic.val_fraction=0.4", "critic.reset_fraction=1.0", "env.max_steps=3",
        "policy.max_new_tokens=6", "rollout.num_workers=1", "rollout.envs_per_worker=2", "learner.num_workers=2",
        "prm.batch_size=2", "prm.micro_batch_size=1", "prm.epochs=4", "prm.max_steps=2", "dpo.batch_size=2",
        "dpo.micro_batch_size=1", "dpo.max_steps=2", "dpo.max_new_tokens=6", "dpo.temperature=1.0",
        "dpo.exploration_prompt=Explore.", "eval.num_games=1", "best_of_n.sizes=[1,2]")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algorithm"] == "inverseprm" and list(summary["success_rate"]) == [
        "pi0", "BoN-1(pi0,Q0)", "BoN-2(pi0,Q0)", "pi1", "BoN-2(pi1,Q0)"]
    assert set(summary["paired_vs_pi0"]) == set(summary["success_rate"]) - {"pi0"}
    critic = run_dir / "iter_1/critic"
    rows = pq.read_table(critic / "transitions.parquet").to_pylist()
    expert = [r for r in rows if r["source"] == "expert"]
    kept = [r for r in rows if r["kept"]]
    assert 0 < sum(r["source"] == "expert" for r in kept) == len(kept) / 2 and {r["label"] for r in expert} == {1.0}
    assert all(r["next_response_ids"] is None for r in rows if r["terminal"] or r["source"] == "policy")
    assert all(r["next_response_ids"] for r in expert if r["kept"] and not r["terminal"])
    report = json.loads((critic / "prm_report.json").read_text())
    assert report["loss"] == "inverse" and report["steps"] == 2
    assert json.loads((run_dir / "iter_1/bon_after/eval.json").read_text())["best_of_n"] == 2
    dataset = json.loads((critic / "dataset.json").read_text())
    assert dataset["states"] == str(critic / "transitions.parquet")
    # The reset distribution (demos and rollouts sample the same 2 games): each rollout starts
    # where the seeded draw puts it along its game's demonstration (all of them, with a
    # fraction of 1, unless the expert lost that game).
    demonstrations = demonstrated_commands(demos_dir / "demos.parquet")
    first: dict[str, dict] = {}
    for s in pq.read_table(run_dir / "iter_1/critic/rollouts").to_pylist():
        if s["episode_id"] not in first or s["step"] < first[s["episode_id"]]["step"]:
            first[s["episode_id"]] = s
    cfg = OmegaConf.load(run_dir / "config.yaml")
    for episode_id, s in first.items():
        k = reset_steps(cfg.seed, cfg.critic.reset_fraction, cfg.env.max_steps, s["game_id"],
                        int(episode_id.split("#")[1]), demonstrations)
        assert s["step"] == k and all(f"ACTION: {c}<|im_end|>" in s["prompt"]
                                      for c in demonstrations.get(s["game_id"], [])[:k])
    assert len(first) == 4 and max(s["step"] for s in first.values()) >= 1
    assert "expert and" in proc.stdout and (run_dir / "success.png").is_file()


def test_serve_mode_answers_an_openai_client_until_stopped(tiny_model, tmp_path):
    import queue
    import signal
    import threading

    import openai

    run_dir = tmp_path / "serve"
    server = subprocess.Popen([sys.executable, "driver.py", "mode=serve", f"run_dir={run_dir}",
                               f"policy.model={tiny_model}", "policy.engine=hf"], cwd=REPO_ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in server.stdout], daemon=True).start()
    try:
        while not (line := lines.get(timeout=300)).startswith("serving "):
            assert server.poll() is None, f"the server ended: {line}"
        (url,) = json.loads((run_dir / "endpoints.json").read_text())["urls"]
        assert url in line
        client = openai.OpenAI(base_url=url, api_key="unused")
        assert [m.id for m in client.models.list().data] == [tiny_model]  # served under policy.model
        chat = client.chat.completions.create(model=tiny_model, max_tokens=6, temperature=0,
                                              messages=[{"role": "user", "content": "Your task is to: look."}])
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
        server.send_signal(signal.SIGINT)  # Ctrl-C
        assert server.wait(timeout=120) == 0
    finally:
        server.kill()
    with pytest.raises(openai.APIConnectionError):
        client.with_options(max_retries=0, timeout=10).models.list()
