"""PNG plots of a sweep, readable at a glance with many methods: each method keeps one colour, marker and line
style in every figure (lines that coincide, or a grey print, still tell them apart); the spread over seeds is
an error bar (bands of seven methods overlap into mud); names sit in a legend, never on the data.

- accuracy against shots (few-shot sweeps), one line per method;
- base against novel accuracy with HM iso-lines, and base / novel / HM bars per method (base-to-novel);
- accuracy per test set, source, each target and their average, one bar per method (cross-dataset, domain
  generalisation).
"""
from __future__ import annotations

from itertools import cycle
from pathlib import Path

from promptlearn.errors import PromptlearnError
from promptlearn.io import atomic_write_bytes

# (mean, std, seeds) as report.mean_std gives it; a float for a derived value (HM of the means); None for n/a
Value = tuple[float, float, int] | float | None

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")  # matplotlib's tab10, reordered so that neighbours in the list contrast
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")
HATCHES = ("", "//", "..", "xx", "\\\\", "--", "oo", "++", "||", "**")


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PromptlearnError("the sweep's plots need matplotlib: pip install 'promptlearn[plot]' "
                               "(or set sweep.plots=false)") from None


def method_styles(methods: list[str]) -> dict[str, dict]:
    """One look per method, by its place in the sweep's list: colour, marker and line style all differ
    between neighbours (10 colours x 10 markers x 4 line styles before a combination repeats)."""
    return {m: {"color": c, "marker": mk, "linestyle": ls, "hatch": h}
            for m, c, mk, ls, h in zip(methods, cycle(COLOURS), cycle(MARKERS), cycle(LINESTYLES), cycle(HATCHES))}


def spread_note(values: list[Value]) -> str:
    """What the error bars show, from the largest seed count among the values."""
    seeds = max((v[2] for v in values if isinstance(v, tuple)), default=1)
    return f"error bars: ± std over {seeds} seeds" if seeds > 1 else "one seed: no spread"


def figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def save(fig, path: str | Path):
    """Write the PNG; the figure is returned for a reader to inspect (the tests check its layout)."""
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=110))
    return fig


def accuracy_plot(path: str | Path, title: str, curve: dict[tuple[str, int], tuple[float, float, int]],
                  methods: list[str]):
    """`curve` maps (method, shots) to (mean, std, seeds); shots on a log2 axis. Each method's points are
    nudged sideways a little so that error bars at the same shot count do not hide each other."""
    fig, ax = figure(6.4, 4.0)
    styles, all_shots = method_styles(methods), sorted({shots for _, shots in curve})
    drawn = [m for m in methods if any(k[0] == m for k in curve)]
    for i, method in enumerate(drawn):
        points = sorted((shots, *value) for (m, shots), value in curve.items() if m == method)
        shots, mean, std, seeds = zip(*points)
        nudge = 2 ** (0.035 * (i - (len(drawn) - 1) / 2))  # a factor: equal steps on the log2 axis
        style = styles[method]
        ax.errorbar([k * nudge for k in shots], mean, yerr=[s if n > 1 else 0 for s, n in zip(std, seeds)],
                    color=style["color"], marker=style["marker"], linestyle=style["linestyle"], markersize=5,
                    linewidth=1.4, elinewidth=0.9, capsize=2.5, alpha=0.9, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_shots, [str(k) for k in all_shots])
    ax.minorticks_off()
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title}\n{spread_note(list(curve.values()))}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return save(fig, path)


def base_novel_plot(path: str | Path, values: dict[str, dict[str, Value]], title: str):
    """Base against novel accuracy per method with HM iso-lines; the methods named in the legend (labels
    beside close points would collide)."""
    fig, ax = figure(6.0, 4.4)
    styles = method_styles(list(values))
    points = {m: (mean_of(v.get("base")), mean_of(v.get("novel"))) for m, v in values.items()}
    points = {m: p for m, p in points.items() if None not in p}
    for method, (base, novel) in points.items():
        style = styles[method]
        ax.scatter(base, novel, s=46, color=style["color"], marker=style["marker"], label=method, zorder=3,
                   edgecolors="black", linewidths=0.4)
        spread = [v[1] if isinstance(v, tuple) and v[2] > 1 else 0.0 for v in (values[method]["base"],
                                                                              values[method]["novel"])]
        if any(spread):
            ax.errorbar(base, novel, xerr=spread[0], yerr=spread[1], fmt="none", ecolor=style["color"],
                        elinewidth=0.8, capsize=2, alpha=0.8, zorder=2)
    every = [x for p in points.values() for x in p]
    low, high = max(0.0, min(every, default=0.0) - 10), min(100.0, max(every, default=100.0) + 10)
    grid = [low + (high - low) * i / 400 for i in range(1, 401)]
    for hm in range(10, 100, 10):  # novel = hm * base / (2 * base - hm) where that is positive
        curve = [(b, hm * b / (2 * b - hm)) for b in grid if 2 * b > hm and low <= hm * b / (2 * b - hm) <= high]
        if len(curve) > 1:
            ax.plot(*zip(*curve), color="grey", linewidth=0.6, alpha=0.5, zorder=1)
            # named at the right edge, inside the axes: apart from each other and from the legend
            ax.annotate(f"HM {hm}", curve[-1], fontsize=6, color="grey", ha="right", va="bottom", xytext=(-2, 2),
                        textcoords="offset points")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_aspect("equal")
    ax.set_xlabel("base accuracy (%)")
    ax.set_ylabel("novel accuracy (%)")
    ax.set_title(f"{title}\n{spread_note([v for m in points for v in values[m].values()])}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return save(fig, path)


def mean_of(value: Value) -> float | None:
    return value[0] if isinstance(value, tuple) else value


def grouped_bars(path: str | Path, title: str, groups: list[str], series: list[str],
                 value: dict[tuple[str, str], Value], series_styles: dict[str, dict] | None = None):
    """One group of bars per entry of `groups`, one bar per entry of `series` (same colour and hatch in
    every group, named in the legend); error bars where a value has more than one seed; n/a bars are
    left out and marked."""
    fig, ax = figure(max(6.0, 1.0 + 0.32 * len(groups) * len(series)), 4.0)
    styles = series_styles or method_styles(series)
    width = 0.8 / len(series)
    for j, name in enumerate(series):
        xs, heights, spread = [], [], []
        for i, group in enumerate(groups):
            v = value.get((group, name))
            x = i - 0.4 + width * (j + 0.5)
            if v is None:
                if (group, name) in value:  # measured as n/a, not absent
                    ax.annotate("n/a", (x, 0), ha="center", va="bottom", fontsize=6, rotation=90, color="grey")
                continue
            xs.append(x)
            heights.append(mean_of(v))
            if isinstance(v, tuple) and v[2] > 1:
                spread.append((x, v[0], v[1]))
        style = styles[name]
        ax.bar(xs, heights, width * 0.92, color=style["color"], hatch=style["hatch"], edgecolor="white",
               linewidth=0.5, label=name)
        if spread:  # only where there is a spread: a zero-height bar of one seed would read as a measurement
            x, mean, std = zip(*spread)
            ax.errorbar(x, mean, yerr=std, fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    ax.set_xticks(range(len(groups)), groups, fontsize=8, rotation=20 if len(groups) > 5 else 0)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{title}\n{spread_note(list(value.values()))}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return save(fig, path)
