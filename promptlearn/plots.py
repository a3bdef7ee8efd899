"""PNG plots of a sweep: accuracy against shots, one line per method with a band for the spread over seeds."""
from __future__ import annotations

from pathlib import Path

from promptlearn.errors import PromptlearnError
from promptlearn.io import atomic_write_bytes


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PromptlearnError("the sweep's plots need matplotlib: pip install 'promptlearn[plot]' "
                               "(or set sweep.plots=false)") from None


def accuracy_plot(path: str | Path, title: str, curve: dict[tuple[str, int], tuple[float, float, int]],
                  methods: list[str]) -> None:
    """`curve` maps (method, shots) to (mean, std, seeds); shots on a log2 axis, mean +- std as a band."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(5.6, 3.8))
    ax = fig.subplots()
    all_shots = sorted({shots for _, shots in curve})
    for method in methods:
        points = sorted((shots, mean, std) for (m, shots), (mean, std, _) in curve.items() if m == method)
        if not points:
            continue
        shots, mean, std = zip(*points)
        line, = ax.plot(shots, mean, marker="o", markersize=4, linewidth=1.6, label=method)
        ax.fill_between(shots, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.18, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_shots, [str(k) for k in all_shots])
    ax.minorticks_off()
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=110))


def base_novel_plot(path: str | Path, points: dict[str, dict[str, float]], backbone: str) -> None:
    """Base against novel accuracy per method (averaged over the sweep's datasets), with HM iso-lines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8, 4.2))
    ax = fig.subplots()
    for method, means in points.items():
        if "base" in means and "novel" in means:
            ax.scatter(means["base"], means["novel"], s=28)
            ax.annotate(method, (means["base"], means["novel"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    grid = [x / 2 for x in range(1, 201)]
    for hm in (20, 40, 60, 80):  # novel = hm * base / (2 * base - hm) where that is positive
        curve = [(b, hm * b / (2 * b - hm)) for b in grid if 2 * b > hm and hm * b / (2 * b - hm) <= 100]
        ax.plot(*zip(*curve), color="grey", linewidth=0.6, alpha=0.5)
        ax.annotate(f"HM {hm}", curve[-1], fontsize=6, color="grey")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("base accuracy (%)")
    ax.set_ylabel("novel accuracy (%)")
    ax.set_title(f"base-to-novel, {backbone}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=110))
