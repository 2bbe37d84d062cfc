"""Configuration: overrides, saved config, one-line errors before any work starts."""
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from configs import REPO_ROOT, ConfigError, load_config, save_config


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(["eval.num_games=3", "rollout.num_workers=4", "eval.temperature=0.3"])
    assert (cfg.eval.num_games, cfg.rollout.num_workers, cfg.eval.temperature) == (3, 4, 0.3)
    # configs/default.yaml over the schema's defaults
    assert (cfg.mode, cfg.env.max_steps, cfg.sft.max_steps) == ("train", 50, 6) and cfg.prompt.history_turns == 8
    saved = OmegaConf.load(save_config(cfg, tmp_path))
    assert saved == cfg


@pytest.mark.parametrize("args,message", [
    (["rollout.nums_workers=2"], "rollout.nums_workers"),
    (["rollout.num_workers=two"], "rollout.num_workers"),
    (["rollout.num_workers=0"], "rollout.num_workers must be at least 1"),
    (["env.max_steps=0"], "env.max_steps must be at least 1"),
    (["eval.split=valid_unseen"], "Invalid value 'valid_unseen', expected one of [train, train_held_out, eval_in_distribution, eval_out_of_distribution] (key: eval.split)"),
    (["mode=training"], "Invalid value 'training', expected one of [eval, demos, sft, critic, train, serve] (key: mode)"),
    (["algorithm=ppo"], "expected one of [agentprm, inverseprm] (key: algorithm)"),
    (["mode=train", "init_policy=./no-pi0"], "model not found: ./no-pi0"),
    (["policy.model=no/such-model"], "model no/such-model is not in the local Hugging Face cache"),
    (["policy.model=./missing-folder"], "model not found: ./missing-folder"),
    (["policy.top_p=0"], "policy.top_p must be in (0, 1]"),
    (["eval.num_games=0"], "eval.num_games must be at least 1"),
    (["numworkers"], "unexpected argument 'numworkers'"),
    (["sft.eval_splits=[eval_out_of_distribution,valid_seen]"], "(key: sft.eval_splits[1])"),
    (["--config", "nowhere.yaml"], "config file not found: nowhere.yaml"),
    (["policy.engine=sglang"], "expected one of [auto, hf, vllm] (key: policy.engine)"),
    (["policy.vllm.weight_transfer=rdma"], "expected one of [local_file, nccl] (key: policy.vllm.weight_transfer)"),
    (["mode=train", "policy.engine=vllm", "policy.vllm.weight_transfer=nccl"],
     "policy.vllm.weight_transfer=nccl is for trainers outside this project"),
    (["dpo.push_every=4", "dpo.checkpoint_every=10"], "dpo.checkpoint_every (10) must be a multiple of dpo.push_every (4)"),
    (["policy.vllm.gpu_memory_utilization=1.5"], "policy.vllm.gpu_memory_utilization must be in (0, 1]"),
    (["policy.openai_port=70000"], "policy.openai_port must be a port number"),
    (["prm.loss=hinge"], "expected one of [absolute, relative] (key: prm.loss)"),
    (["prm.batch_size=30"], "prm.batch_size (30) must be a multiple of learner.num_workers x prm.micro_batch_size"),
    (["critic.discount=forward"], "expected one of [to_go, from_start] (key: critic.discount)"),
    (["critic.num_games=1", "critic.val_fraction=0.1"], "critic.val_fraction=0.1 holds out all 1 games"),
    (["mode=eval", "best_of_n.prm=configs"], "mode=eval with best_of_n.prm needs the N to play: best_of_n.sizes"),
    (["mode=eval", "best_of_n.sizes=[4]", "best_of_n.prm=configs"], "best_of_n.prm: configs is not a Hugging Face folder"),
    (["mode=train", "best_of_n.sizes=[4]", "best_of_n.prm=configs"], "best_of_n.prm is mode=eval's PRM"),
    (["policy.temperature=0.7"], "policy.temperature"),  # each stage has its own: eval.temperature, ...
    (["mode=critic", "prm.init=./no-such-model"], "model not found: ./no-such-model"),
    (["mode=critic", "algorithm=inverseprm"], "algorithm=inverseprm needs expert demonstrations: sft.demos="),
    (["mode=train", "init_policy=configs", "critic.reset_fraction=0.5"],
     "critic.reset_fraction > 0 needs expert demonstrations"),
    (["learner.dtype=bfloat16", "learner.autocast_bf16=true"], "learner.autocast_bf16 keeps float32 weights"),
    (["critic.reset_fraction=1.5"], "critic.reset_fraction must be in [0, 1]"),
    (["best_of_n.sizes=[4]", "best_of_n.temperature=0"], "best_of_n.temperature must be > 0"),
    (["best_of_n.sizes=[0]"], "best_of_n.sizes: every N must be at least 1"),
    (["dpo.samples_per_state=1"], "dpo.samples_per_state must be at least 2"),
])
def test_bad_config_is_one_clear_line(args, message):
    with pytest.raises(ConfigError) as info:
        load_config(args)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_the_engine_is_vllm_where_installed_and_needs_it():
    import importlib.util

    installed = importlib.util.find_spec("vllm") is not None
    assert load_config([]).policy.engine == ("vllm" if installed else "hf")  # auto: vLLM wherever it is installed
    if installed:
        assert load_config(["policy.engine=vllm"]).policy.engine == "vllm"
    else:
        with pytest.raises(ConfigError, match="policy.engine=vllm needs vLLM in this environment"):
            load_config(["policy.engine=vllm"])


def test_missing_games_archive_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTPRM_CACHE", str(tmp_path))  # nothing unpacked there
    with pytest.raises(ConfigError, match="no ALFWorld games"):
        load_config(["data.archive=missing.tar.xz"])
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="has no json_2.1.1/ folder"):
        load_config([])


def test_driver_exits_before_ray_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "driver.py", "rollout.num_workers=0", f"run_dir={tmp_path}/run"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: config: rollout.num_workers must be at least 1"
    assert "Ray" not in proc.stdout + proc.stderr and not (tmp_path / "run").exists()


def test_a_run_dir_keeps_its_config(tmp_path):
    cfg = load_config(["eval.num_games=3"])
    save_config(cfg, tmp_path)
    save_config(cfg, tmp_path)  # the same config: a resume
    with pytest.raises(ConfigError, match=r"different config \(eval.num_games, seed\); use another run_dir"):
        save_config(load_config(["eval.num_games=4", "seed=1"]), tmp_path)
    # More workers or another cluster: the same episodes, so the run resumes with them.
    scaled = load_config(["eval.num_games=3", "rollout.num_workers=8", "policy.replicas=2", "ray.dashboard=false"])
    save_config(scaled, tmp_path)
    assert OmegaConf.load(tmp_path / "config.yaml").rollout.num_workers == 8
    with pytest.raises(ConfigError, match=r"different config \(learner.zero_stage\)"):
        save_config(load_config(["eval.num_games=3", "learner.zero_stage=3"]), tmp_path)


def test_a_run_from_before_new_config_keys_still_resumes(tmp_path):
    """Keys added to the schema later read as their defaults in an older run's config.yaml."""
    cfg = load_config(["eval.num_games=3"])
    save_config(cfg, tmp_path)
    saved = OmegaConf.load(tmp_path / "config.yaml")
    del saved["critic"]["reset_fraction"]
    del saved["dpo"]["exploration_prompt"]
    del saved["prm"]["loss"]
    OmegaConf.save(saved, tmp_path / "config.yaml")
    save_config(cfg, tmp_path)
    with pytest.raises(ConfigError, match=r"different config \(prm.loss\)"):
        save_config(load_config(["eval.num_games=3", "prm.loss=relative"]), tmp_path)


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads(path):
    # (the engine and model are overridden: this environment may lack vLLM and the 3B model
    # of the cluster config)
    cfg = load_config(["--config", str(path), "policy.engine=hf", "policy.model=smollm2-135m-instruct"])
    assert cfg.mode in ("eval", "sft", "critic", "train")
