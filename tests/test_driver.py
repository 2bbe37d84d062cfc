"""The driver end to end on a tiny model, and the eval report."""
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

import driver
import stages
from configs import REPO_ROOT
from reports.best_of_n import choice_stats
from reports.paired import format_paired, load_evaluation, paired
from rollout_workers import SCHEMA, demonstrated_commands, format_report, reset_steps, summarize
from rollout_workers.records import StepRecord, write_episode


def test_summarize_hand_built_records():
    def step(ep, task, i, valid, won=False):
        return dict(game_id=ep, task_type=task, episode_id=f"{ep}#0", step=i, prompt="p", response="r",
                    action="a", valid=valid, observation="o", reward=float(won), done=won, won=won,
                    policy_version=0, worker_id=0)
    rows = [step("g1", "pick", 0, True), step("g1", "pick", 1, False), step("g1", "pick", 2, True, won=True),
            step("g2", "pick", 0, False), step("g3", "heat", 0, True, won=True)]
    report = summarize(pa.Table.from_pylist(rows, schema=SCHEMA))
    assert report["episodes"] == 3 and report["success_rate"] == 2 / 3
    assert report["per_task_type"] == {"pick": {"episodes": 2, "success_rate": 0.5},
                                       "heat": {"episodes": 1, "success_rate": 1.0}}
    assert report["mean_steps"] == 5 / 3 and report["invalid_action_rate"] == 2 / 5
    assert report["repeated_step_rate"] == 2 / 5  # g1's second and third steps repeat its first
    assert report["context_rule_restarts"] == 0  # records written before the column read it as null
    assert report["won_per_game"] == {"g1": [1, 1], "g2": [0, 1], "g3": [1, 1]}
    text = format_report({**report, "split": "eval_out_of_distribution", "max_steps": 50, "seed": 0})
    assert "pick" in text and "66.7%" in text and "max_steps 50" in text


def test_best_of_n_choice_stats_on_hand_made_steps():
    def step(action, candidates, samples, scores, admissible=("look", "go to desk 1")):
        return dict(action=action, candidate_actions=candidates, candidate_samples=samples, candidate_scores=scores,
                    admissible_commands=list(admissible))
    steps = [step("look", ["look", "fly"], [15, 1], [0.5, 0.1]),  # the majority
             step("fly", ["look", "fly"], [15, 1], [0.1, 0.5]),  # one sample, invalid over a valid one
             step("go to desk 1", ["look", "go to desk 1", "x"], [8, 7, 1], [0.1, 0.6, 0.2]),
             step("x", ["x", "y"], [8, 8], [0.9, 0.1]),  # a tie counts as the majority; no valid offered
             step("look", ["look"], [16], None)]  # no choice: not counted
    stats = choice_stats(steps)
    assert stats["steps_with_a_choice"] == 4 and stats["mean_candidates"] == 2.25
    assert stats["played_the_majority"] == 0.5 and stats["played_a_single_sample"] == 0.25
    assert stats["played_invalid_over_a_valid"] == round(1 / 3, 4)
    assert choice_stats(steps[-1:]) == {"steps_with_a_choice": 0}


def test_paired_comparison_counts_only_the_shared_games_and_gives_the_exact_mcnemar_p(tmp_path):
    # b wins 9 games a loses, a wins 1 game b loses, both win 5: p = 2 * (C(10,0) + C(10,1)) / 2^10
    a = {"won_per_game": {**{f"d{i}": [0, 1] for i in range(9)}, "e": [1, 1], **{f"s{i}": [1, 1] for i in range(5)},
                          "only_in_a": [1, 1]}}
    b = {"won_per_game": {**{f"d{i}": [1, 1] for i in range(9)}, "e": [0, 1], **{f"s{i}": [1, 1] for i in range(5)}}}
    result = paired(a, b, ("pi0", "pi1"))
    assert result["games"] == 15 and (result["a_only"], result["b_only"]) == (1, 9)
    assert result["a_success"] == 6 / 15 and result["b_success"] == 14 / 15
    assert result["p_value"] == pytest.approx(22 / 1024)
    assert paired(a, a)["p_value"] == 1.0  # no discordant game
    assert "p = 0.0215" in format_paired(result)
    with pytest.raises(ValueError, match="share no game"):
        paired(a, {"won_per_game": {"other": [1, 1]}})
    with pytest.raises(ValueError, match="one per game"):
        paired(a, {"won_per_game": {"e": [1, 2]}})
    # An evaluation still running, read from its shards: paired on the games it finished.
    for game, won in (("d0", True), ("e", False)):
        write_episode(tmp_path, [StepRecord(
            game_id=game, task_type="pick", episode_id=f"{game}#0", step=0, task="t", room="r", admissible_commands=[],
            prompt="p", prompt_ids=[], context_start=True, context_rule=False, response="r", response_ids=[],
            action="a", valid=True, observation="o", reward=float(won), done=True, won=won, policy_version=0,
            worker_id=0)])
    running = paired(a, load_evaluation(tmp_path))
    assert running["games"] == 2 and (running["a_only"], running["b_only"]) == (1, 1)
    (tmp_path / "a.json").write_text(json.dumps(a))
    cli = subprocess.run([sys.executable, "-m", "reports.paired", str(tmp_path / "a.json"), str(tmp_path),
                          "--names", "pi0", "pi1", "--out", str(tmp_path / "p.json"), "--plot", str(tmp_path / "p.png")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and "2 games: pi0 50.0%, pi1 50.0%" in cli.stdout, cli.stderr
    assert json.loads((tmp_path / "p.json").read_text()) == {**running, "a": "pi0", "b": "pi1"}
    assert (tmp_path / "p.png").stat().st_size > 0


def run_driver(*args):
    """The driver in a process of its own; demonstrations go to a store beside the run, not
    into the user's cache."""
    run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("run_dir="))
    store = [f"demos.store={run_dir}-demonstrations"] if not any(a.startswith("demos.store=") for a in args) else []
    proc = subprocess.run([sys.executable, "driver.py", *args, *store], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


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


def test_a_finished_evaluation_starts_nothing_again(tiny_model, tmp_path, monkeypatch):
    """Resuming past a finished set of episodes starts no policy server or workers (a vLLM
    start-up is most of a minute on CPU)."""
    run_dir = tmp_path / "eval"
    run_driver(f"run_dir={run_dir}", "mode=eval", f"policy.model={tiny_model}", "eval.num_games=2", "env.max_steps=2",
               "policy.max_new_tokens=6", "rollout.num_workers=1", "rollout.envs_per_worker=2")
    report = json.loads((run_dir / "eval.json").read_text())

    def start_nothing(*args, **kwargs):
        raise AssertionError("started servers for a finished set of episodes")
    monkeypatch.setattr(driver, "play_missing", start_nothing)
    again = driver.evaluate(OmegaConf.load(run_dir / "config.yaml"), run_dir)
    assert again["episodes"] == report["episodes"] == 2
    assert again["success_rate"] == report["success_rate"]


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
            "prm.micro_batch_size=1", "prm.epochs=4", "prm.max_steps=2", "critic.best_of_n=[1,2]",
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
            "dpo.monitor_games=1", "dpo.monitor_every=2"]
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
        "dpo.exploration_prompt=Explore.", "eval.num_games=1", "eval.best_of_n=[1,2]")
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
