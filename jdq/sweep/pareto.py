"""Pareto fronts of sweep points (minimise latency, best quality) and their plot."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pareto_front(cost: Sequence[float], quality: Sequence[float], higher_is_better: bool = False) -> list[int]:
    """Indices of the non-dominated points (lower ``cost``; lower ``quality`` unless ``higher_is_better``), by cost.

    Point ``i`` is dominated when another point is at least as good in both and strictly better in
    one; non-finite points are never on the front. Exact ties keep the first point.
    """
    c = np.asarray(cost, np.float64)
    q = np.asarray(quality, np.float64) * (-1.0 if higher_is_better else 1.0)
    if c.shape != q.shape or c.ndim != 1:
        raise ValueError(f"pareto_front: cost and quality must be 1-d of one length, got {c.shape} and {q.shape}")
    ok = np.isfinite(c) & np.isfinite(q)
    front = []
    for i in np.flatnonzero(ok):
        better_eq = ok & (c <= c[i]) & (q <= q[i])
        strictly = better_eq & ((c < c[i]) | (q < q[i]))
        tie_before = better_eq & (c == c[i]) & (q == q[i]) & (np.arange(len(c)) < i)
        if not strictly.any() and not tie_before.any():
            front.append(int(i))
    return sorted(front, key=lambda i: (c[i], q[i]))


def plot_pareto(path, cost, quality, labels, *, xlabel: str, ylabel: str, higher_is_better: bool = False,
                title: str = "", errors=None):
    """Write a PNG (atomically): every point labelled, the Pareto front highlighted and joined; returns the path.

    ``errors``: optional ``(low, high)`` arrays of the quality's interval, drawn as error bars.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jdq.io import atomic_write

    c, q = np.asarray(cost, np.float64), np.asarray(quality, np.float64)
    front = pareto_front(c, q, higher_is_better)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    if errors is not None:
        lo, hi = (np.asarray(e, np.float64) for e in errors)
        ax.errorbar(c, q, yerr=[np.maximum(q - lo, 0), np.maximum(hi - q, 0)], fmt="none", ecolor="0.7", zorder=1)
    ax.scatter(c, q, color="0.5", zorder=2, label="points")
    ax.plot(c[front], q[front], "-o", color="tab:red", zorder=3, label="Pareto front")
    for i, text in enumerate(labels):
        ax.annotate(text, (c[i], q[i]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                    color="tab:red" if i in front else "0.3")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel + (" (higher is better)" if higher_is_better else " (lower is better)"))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
