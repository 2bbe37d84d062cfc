"""Learners on Ray Train: each worker drives a DeepSpeed engine (or plain DDP, the baseline).

    policy_dir = train_sft(cfg, demos_parquet, base_model, out_dir)   # π0, a Hugging Face folder
    summary = build_dataset(rollout_steps, out_dir, gamma, discount, margin, val_fraction, seed)  # Q-targets
    report = train_prm(cfg, out_dir, init_model, out_dir)             # the PRM: out_dir/prm
    summary = build_transitions(without_outcome(demos), without_outcome(rollouts), sample_next, out_dir, ...)
    report = train_inverse_prm(cfg, out_dir, init_model, out_dir)     # InversePRM's PRM: out_dir/prm
    policy_dir = train_dpo(cfg, states, policy_model, policy, prm, out_dir)  # online DPO: out_dir/policy

`sft.py`, `prm.py`, `inverse.py` and `dpo.py` are the recipes; `qtargets.py` AgentPRM's stage 1
data (Monte Carlo Q-targets, preference pairs), `inverse.py` also InversePRM's (expert vs policy
transitions); `trainer.py` the Ray Train job, step loop, checkpoints and
metrics shared by the recipes; `engines.py` the DeepSpeed and DDP engines; `data.py`
tokenization and loss masks; `monitor.py` the reward-hacking monitor that watches DPO's
policy versions.
"""
from learners.data import IGNORE, TokenizedExample, episode_sequences, pack
from learners.dpo import train_dpo
from learners.monitor import RewardHackingMonitor
from learners.inverse import build_transitions, sample_next_actions, train_inverse_prm, without_outcome
from learners.prm import train_prm
from learners.qtargets import build_dataset, states_of
from learners.sft import train_sft
from learners.trainer import learner_failure

__all__ = ["train_sft", "train_prm", "train_dpo", "build_dataset", "build_transitions", "sample_next_actions",
           "train_inverse_prm", "without_outcome", "states_of", "TokenizedExample", "IGNORE",
           "episode_sequences", "pack", "RewardHackingMonitor", "learner_failure"]
