"""Plots of a run's results, saved as PNG beside their JSON (matplotlib, no display needed)."""
from reports.plots import plot_best_of_n, plot_monitor, plot_reliability, plot_success, plot_target_histogram

__all__ = ["plot_best_of_n", "plot_monitor", "plot_reliability", "plot_success", "plot_target_histogram"]
