"""cluster.yaml passes Ray's own validation; a job submitted to a local head runs the driver."""
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from configs import REPO_ROOT, load_config


def test_cluster_yaml_is_valid_and_matches_the_cluster_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cluster)))
    nodes = cluster["available_node_types"]
    # (the engine is overridden: this environment may lack vLLM, which the config's engine needs)
    cfg = load_config(["--config", str(REPO_ROOT / "configs/gpu_cluster.yaml"), "policy.engine=hf",
                       "policy.model=smollm2-135m-instruct"])
    # every custom resource an actor asks for is offered by some node type, else it waits forever
    for wanted in (cfg.rollout.resources, cfg.policy.resources, cfg.prm_service.resources,
                   cfg.learner.resources_per_worker):
        for key in wanted:
            assert any(key in node.get("resources", {}) for node in nodes.values()), key
    assert nodes["rollout"]["max_workers"] > nodes["rollout"]["min_workers"]  # autoscaling CPU nodes
    # every node installs the project; the driver's (head) and policy servers' (gpu) with vLLM
    assert any("scripts/setup.sh" in c for c in cluster["worker_setup_commands"])
    for commands in (cluster["head_setup_commands"], nodes["gpu"]["worker_setup_commands"]):
        assert any("scripts/setup.sh vllm" in c for c in commands)
    assert yaml.safe_load((REPO_ROOT / "configs/gpu_cluster.yaml").read_text())["policy"]["engine"] == "vllm"
    # one run directory that every node sees: each node (setup_commands) mounts it
    assert any("mount -t nfs4" in c and "~/runs" in c for c in cluster["setup_commands"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_head(head: subprocess.Popen, dash_port: int) -> None:
    """Until `ray start` reports the runtime up and the job API answers (bounded)."""
    for line in head.stdout:
        if b"Ray runtime started" in line:
            break
    else:
        raise RuntimeError("ray start --head exited before the runtime started")
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{dash_port}/api/version", timeout=1)
            return
        except OSError:
            time.sleep(0.5)  # polling a condition, with a bound: the dashboard starts after the runtime
    raise RuntimeError("the Ray dashboard did not come up")


def test_ray_job_submit_runs_the_driver(tiny_model, tmp_path):
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    gcs_port, dash_port = free_port(), free_port()
    ray_tmp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [f"{bin_dir}/ray", "start", "--head", "--block", f"--port={gcs_port}", f"--dashboard-port={dash_port}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--num-cpus=4",
         f"--temp-dir={ray_tmp}",
         "--include-dashboard=true", "--disable-usage-stats",
         # every port Ray would otherwise take at a fixed number, in case another Ray runs here
         *(f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                  "metrics-export-port", "runtime-env-agent-port",
                                                  "ray-client-server-port", "node-manager-port",
                                                  "object-manager-port"))],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    run_dir = tmp_path / "job-run"
    archive = OmegaConf.structured(load_config([])).data.archive
    try:
        wait_for_head(head, dash_port)
        submit = [f"{bin_dir}/ray", "job", "submit", f"--address=http://127.0.0.1:{dash_port}", "--working-dir",
                  ".", "--", "python", "driver.py", "mode=eval", f"run_dir={run_dir}", f"policy.model={tiny_model}",
                  f"data.archive={(REPO_ROOT / archive).resolve()}", "eval.num_games=2", "env.max_steps=2",
                  "policy.max_new_tokens=4", "rollout.num_workers=1", "rollout.envs_per_worker=2", "policy.engine=hf"]
        for _ in range(30):  # the head's job agent registers a little after the dashboard answers
            job = subprocess.run(submit, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
            if "No available agent" not in job.stderr:
                break
            time.sleep(1)
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # only this head's processes; never `ray stop`
        head.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr
    assert json.loads((run_dir / "eval.json").read_text())["episodes"] == 2
