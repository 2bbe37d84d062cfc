"""One function per figure; each takes the numbers already saved as JSON and writes a PNG."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_best_of_n(success_by_n: dict[int, float], path: Path, title: str) -> Path:
    """Success rate against N (the paper's Figure 2b), N on a log-2 axis."""
    ns = sorted(success_by_n)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ns, [100 * success_by_n[n] for n in ns], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set(xlabel="N (samples per step)", ylabel="success rate (%)", title=title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_target_histogram(histogram: dict, path: Path, title: str) -> Path:
    """Counts of the Q-targets (rescaled to [0, 1]) per bin."""
    edges, counts = histogram["edges"], histogram["counts"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges, edges[1:])], align="edge", edgecolor="black")
    ax.set(xlabel="Q-target (rescaled to [0, 1])", ylabel="(state, action) pairs", title=title)
    return _save(fig, path)


def plot_reliability(reliability: list[dict], path: Path, title: str) -> Path:
    """Mean sigmoid(Q) against the mean Monte Carlo target per bin; the diagonal is calibrated."""
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--")
    ax.plot([b["mean_prediction"] for b in reliability], [b["mean_target"] for b in reliability], marker="o")
    ax.set(xlabel="mean sigmoid(Q)", ylabel="mean Q-target", xlim=(0, 1), ylim=(0, 1), title=title)
    return _save(fig, path)


def plot_success(success: dict[str, float], versus_pi0: dict[str, dict], path: Path, title: str) -> Path:
    """Success rate of each evaluation of a run, in order (the paper's Figure 2: π0,
    Best-of-N(π0, Q0), π1, ...), each labelled with its paired p-value against π0."""
    names = list(success)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names)), 3.8))
    bars = ax.bar(range(len(names)), [100 * success[k] for k in names],
                  color=["tab:gray" if k == "pi0" else "tab:green" if k.startswith("BoN") else "tab:blue"
                         for k in names])
    for bar, name in zip(bars, names):
        label = f"{100 * success[name]:.1f}%"
        if name in versus_pi0:
            label += f"\np={versus_pi0[name]['p_value']:.2g}"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=7, textcoords="offset points", xytext=(0, 2))
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="success rate (%)", ylim=(0, 115), title=title)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_monitor(records: list[dict], path: Path, title: str) -> Path:
    """The PRM's mean score of the policy's actions and the real success rate, per policy
    version (the paper's Figure 3): two axes, one figure."""
    versions = [r["version"] for r in records]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(versions, [r["prm_mean_score"] for r in records], marker="o", color="tab:blue")
    ax.set(xlabel="policy version", title=title)
    ax.set_ylabel("PRM mean Q (logit), held-out states", color="tab:blue")
    twin = ax.twinx()
    twin.plot(versions, [100 * r["success_rate"] for r in records], marker="s", color="tab:red")
    twin.set_ylabel("success rate (%)", color="tab:red")
    return _save(fig, path)
