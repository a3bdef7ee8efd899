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
