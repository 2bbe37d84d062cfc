"""Rollout workers on Ray: two workers, real games, a tiny policy behind the policy server."""
import os
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pytest

from policy_server import start_policy_servers
from rollout_workers import EpisodeTask, format_report, read_steps, run_episodes, start_rollout_workers, summarize
from rollout_workers.records import SCHEMA
from tests.conftest import small_cfg


NO_PRM_COLUMNS = ("prm_score", "candidate_actions", "candidate_samples", "candidate_scores")


def check_episodes(table, tasks):
    """Every task played once; ids unique; steps contiguous; won and done only at the end."""
    assert table.schema == SCHEMA
    by_episode = defaultdict(list)
    for row in table.to_pylist():
        for key in SCHEMA.names:
            assert row[key] is not None or key in NO_PRM_COLUMNS, key  # no PRM here
        assert all(row[key] is None for key in NO_PRM_COLUMNS) and row["candidates"] == 1
        by_episode[row["episode_id"]].append(row)
    assert sorted(by_episode) == sorted(t.episode_id for t in tasks)
    for rows in by_episode.values():
        assert [r["step"] for r in rows] == list(range(len(rows)))
        assert all(not r["done"] and not r["won"] and r["reward"] == 0 for r in rows[:-1])
        assert rows[-1]["done"] and rows[-1]["reward"] == float(rows[-1]["won"])
        assert len({(r["game_id"], r["task_type"], r["worker_id"]) for r in rows}) == 1
        assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in rows)
    return by_episode


def test_two_workers_llm_rollout(ray_local, tiny_model, ood_games, tmp_path):
    cfg = small_cfg(**{"rollout.num_workers": 2, "rollout.envs_per_worker": 2, "env.max_steps": 4,
                       "policy.max_new_tokens": 8, "policy.device": "cpu"})
    policy = start_policy_servers(cfg.policy, tiny_model, seed=0)
    workers = start_rollout_workers(cfg, "llm", tiny_model, policy, temperature=1.0)
    tasks = [EpisodeTask(g, e, seed=100 * i + e) for i, g in enumerate(ood_games[:3]) for e in range(2)]
    assert run_episodes(workers, 2, tasks[:4], tmp_path / "episodes") == 4
    # a second run over the same folder plays only what is missing
    assert run_episodes(workers, 2, tasks, tmp_path / "episodes") == 2
    episodes = check_episodes(read_steps(tmp_path / "episodes"), tasks)
    rows = [r for ep in episodes.values() for r in ep]
    assert {r["worker_id"] for r in rows} == {0, 1}  # both workers played
    assert all(r["policy_version"] == 0 for r in rows)
    assert all(len(ep) == 4 for ep in episodes.values())  # a random policy does not win in 4 steps
    # invalid responses are still sent to the game, which answers "Nothing happens."
    assert all(r["observation"] == "Nothing happens." for r in rows if not r["valid"])
    # a third plays nothing: finished episodes are kept
    assert run_episodes(workers, 2, tasks, tmp_path / "episodes") == 0


@pytest.mark.parametrize("agent", ["expert", "random"])
def test_expert_and_random_rollouts(ray_local, tiny_model, ood_games, tmp_path, agent):
    cfg = small_cfg(**{"rollout.num_workers": 2, "rollout.envs_per_worker": 2, "env.max_steps": 30})
    workers = start_rollout_workers(cfg, agent, tiny_model, None)
    tasks = [EpisodeTask(g, 0, seed=i) for i, g in enumerate(ood_games[:3])]
    run_episodes(workers, 2, tasks, tmp_path / "episodes")
    episodes = check_episodes(read_steps(tmp_path / "episodes"), tasks)
    rows = [r for ep in episodes.values() for r in ep]
    assert all(r["valid"] and r["policy_version"] == -1 for r in rows)
    if agent == "expert":
        assert all(ep[-1]["won"] for ep in episodes.values())


def test_a_killed_worker_loses_no_episode(ray_local, tiny_model, ood_games, tmp_path):
    """SIGKILL-like failure of a worker mid-run: Ray restarts it and replays its episodes."""
    import threading
    import time

    import ray

    cfg = small_cfg(**{"rollout.num_workers": 2, "rollout.envs_per_worker": 2, "env.max_steps": 25})
    workers = start_rollout_workers(cfg, "random", tiny_model, None)
    tasks = [EpisodeTask(g, 0, seed=i) for i, g in enumerate(ood_games[:8])]
    episodes_dir = tmp_path / "episodes"
    killed = threading.Event()

    def kill_after_first_episode():
        for _ in range(600):  # bounded wait for a condition: one episode on disk
            if any(episodes_dir.glob("*.parquet")):
                ray.kill(workers[0], no_restart=False)
                killed.set()
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_after_first_episode)
    killer.start()
    run_episodes(workers, 2, tasks, episodes_dir)
    killer.join()
    assert killed.is_set()
    check_episodes(read_steps(episodes_dir), tasks)


def play_through_a_lost_node(tokenizer_path: str, episodes_dir: str) -> None:
    """Run in a process of its own (a Ray of several nodes, apart from the tests' local one):
    two rollout workers on a node that is removed, with a replacement node added, right after
    the first episode is written, while the others are in flight. Prints each worker's
    restarts as JSON."""
    import json

    import ray
    from ray._private import state as ray_state
    from ray.cluster_utils import Cluster

    import rollout_workers.runner as runner
    from configs.schema import DataConfig
    from envs import list_games, resolve_data_root

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    doomed = cluster.add_node(num_cpus=2, resources={"rollout_node": 2})
    ray.init(address=cluster.address)
    cfg = small_cfg(**{"rollout.num_workers": 2, "rollout.envs_per_worker": 2, "env.max_steps": 25,
                       "rollout.resources": "{rollout_node: 1}"})
    workers = start_rollout_workers(cfg, "random", tokenizer_path, None)
    games = list_games("eval_out_of_distribution", resolve_data_root(DataConfig().archive))[:8]
    write = runner.write_episode

    def write_then_lose_the_node(folder, steps):
        path = write(folder, steps)
        if doomed in cluster.worker_nodes:  # the first episode written
            cluster.add_node(num_cpus=2, resources={"rollout_node": 2})
            cluster.remove_node(doomed)
        return path

    runner.write_episode = write_then_lose_the_node
    run_episodes(workers, 2, [EpisodeTask(g, 0, seed=i) for i, g in enumerate(games)], Path(episodes_dir))
    restarts = [a["NumRestarts"] for a in ray_state.actors().values() if a["ActorClassName"] == "RolloutWorker"]
    print(json.dumps({"restarts": restarts}), flush=True)
    ray.shutdown()
    cluster.shutdown()


def test_a_lost_node_loses_no_episode(tiny_model, ood_games, tmp_path):
    """The node holding both rollout workers goes (Cluster.remove_node) while episodes are in
    flight: the workers come back on another node and every episode is written once."""
    import json
    import subprocess
    import sys

    from configs import REPO_ROOT

    code = (f"from tests.test_rollout import play_through_a_lost_node; "
            f"play_through_a_lost_node({tiny_model!r}, {str(tmp_path / 'episodes')!r})")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    restarts = next(json.loads(line)["restarts"] for line in done.stdout.splitlines() if line.startswith('{"restarts"'))
    assert restarts == [1, 1]  # both were on the lost node
    check_episodes(read_steps(tmp_path / "episodes"), [EpisodeTask(g, 0, seed=i) for i, g in enumerate(ood_games[:8])])


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
