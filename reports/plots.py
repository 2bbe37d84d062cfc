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


def plot_success(success: dict[str, float | None], path: Path, title: str,
                 best_of_n: dict[str, float] | None = None) -> Path:
    """Success rate of each policy of a run, in order (the paper's Figure 2a); with
    `best_of_n` ({"pi1+Q0": rate, ...}), Best-of-N of a policy with a PRM beside it (Figure 5b)."""
    names = [k for k, v in success.items() if v is not None]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(len(names)), [100 * success[k] for k in names], marker="o", label="policy")
    if best_of_n:
        points = [(names.index(k.split("+")[0]), 100 * v, k) for k, v in best_of_n.items()
                  if k.split("+")[0] in names]
        ax.scatter([x for x, _, _ in points], [y for _, y, _ in points], marker="^", color="tab:green",
                   label="Best-of-N with the PRM", zorder=3)
        for x, y, key in points:
            ax.annotate(key.split("+")[1], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.legend()
    ax.set_xticks(range(len(names)), names)
    ax.set(xlabel="policy", ylabel="success rate (%)", title=title)
    ax.grid(alpha=0.3)
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
