"""Result tables: one run's table in its protocol's layout."""
from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from promptlearn.protocols import SELECTION_TEXT, Protocol

if TYPE_CHECKING:
    from promptlearn.config import RunConfig

# (method, column) -> (mean, std, seeds); a column every seed has n/a for maps to None
Cells = dict[tuple[str, str], tuple[float, float, int] | None]


def metric(entry: dict, key: str | tuple[str, str]):
    if isinstance(key, tuple):
        return (entry.get(key[0]) or {}).get(key[1])
    return entry.get(key)


def run_table(protocol: Protocol, metrics: dict[str, dict], title: str, selection: str) -> str:
    """A run's table: the protocol's columns per method; n/a cells with their reasons below the table."""
    columns = protocol.table_columns(metrics)
    lines = [f"### {title}", "", f"Protocol {protocol.name}: {protocol.summary}. Model selection: "
             f"{SELECTION_TEXT[selection]}.", "",
             "| method | " + " | ".join(h for _, h in columns) + " | train s |",
             "|---|" + "---:|" * (len(columns) + 1)]
    notes = []
    for name, m in metrics.items():
        cells = " | ".join(cell_text(metric(m, key)) for key, _ in columns)
        lines.append(f"| {name} | {cells} | {m.get('train_seconds', 0.0):.1f} |")
        notes += [f"- {name}, {where}: n/a, {why}" for where, why in m.get("na", {}).items()]
    return "\n".join(lines + ([""] + notes if notes else []))


# ----------------------------------------------------------------------------- a protocol sweep's report

def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def aggregate(protocol: Protocol, rows: list[dict], datasets: list[str]) -> Cells:
    """Per seed, each column averaged over `datasets` (n/a if any dataset has it n/a or lacks the seed), then
    mean +- std over the seeds."""
    per_seed: dict[tuple[str, str, int], dict[str, float | None]] = {}
    for r in rows:
        if r["dataset"] in datasets:
            for column, value in protocol.report_values(r).items():
                per_seed.setdefault((r["method"], column, r["seed"]), {})[r["dataset"]] = value
    by_cell: dict[tuple[str, str], list[float | None]] = {}
    for (method, column, _), values in per_seed.items():
        if all(d in values for d in datasets):
            numbers = [values[d] for d in datasets]
            by_cell.setdefault((method, column), []).append(
                None if None in numbers else statistics.fmean(numbers))
    return {key: None if None in values else mean_std(values) for key, values in by_cell.items()}


def columns_of(protocol: Protocol, rows: list[dict]) -> list[str]:
    columns = list(dict.fromkeys(c for r in rows for c in protocol.report_values(r)))
    return columns + list(protocol.derived({}))


def cell_text(value: tuple[float, float, int] | float | None) -> str:
    """mean ± std over seeds; the mean alone from one seed (it has no spread) or for a derived value."""
    if value is None:
        return "n/a"
    if isinstance(value, tuple):
        return f"{value[0]:.2f} ± {value[1]:.2f}" if value[2] > 1 else f"{value[0]:.2f}"
    return f"{value:.2f}"


# a report column -> its header where the column's own name does not say what it is
COLUMN_HEADERS = {"average": "targets average"}


def method_values(protocol: Protocol, rows: list[dict], methods: list[str],
                  datasets: list[str]) -> tuple[list[str], dict[str, dict]]:
    """The report's columns, and per method (those with results) each column's (mean, std, seeds) over
    `datasets`, None for n/a, with the protocol's derived columns (HM) from the means."""
    cells = aggregate(protocol, rows, datasets)
    columns = columns_of(protocol, rows)
    out = {}
    for method in methods:
        values = {c: cells[(method, c)] for c in columns if (method, c) in cells}
        if values:
            values.update(protocol.derived({c: v[0] if v else None for c, v in values.items()}))
            out[method] = values
    return columns, out


def protocol_table(protocol: Protocol, rows: list[dict], methods: list[str], datasets: list[str],
                   published: dict[str, dict[str, float]]) -> str:
    """The methods' rows, then the papers' figures in `published` (method -> column -> value)."""
    columns, by_method = method_values(protocol, rows, methods, datasets)
    lines = ["| method | " + " | ".join(COLUMN_HEADERS.get(c, c) for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for method, values in by_method.items():
        lines.append(f"| {method} | " + " | ".join(cell_text(values[c]) if c in values else "–" for c in columns)
                     + " |")
    for method, figures in published.items():
        lines.append(f"| {method} (published) | "
                     + " | ".join(cell_text(figures[c]) if c in figures else "–" for c in columns) + " |")
    return "\n".join(lines)


def published_figures(protocol: Protocol, rows: list[dict], datasets: list[str],
                      cfg: "RunConfig") -> tuple[dict[str, dict[str, float]], list[str]]:
    """The papers' figures to print beside a sweep's results, and a one-line note for each left out, saying why.
    They are shown for the papers' setting only (backbone and weights, shots, datasets, targets) under
    `recipe: published`, and each only beside its own method's runs, every one of which ran the published recipe
    with no key changed (the `recipe` record of its metrics)."""
    if not protocol.published:
        return {}, ["No published figures are shown: promptlearn holds none for this protocol."]
    if not protocol.published_applies(cfg, datasets):
        return {}, ["No published figures are shown: they exist only for ViT-B-16 (openai), 16 shots, and the "
                    "papers' datasets."]
    if cfg.recipe != "published":
        return {}, [f"No published figures are shown: this sweep ran `recipe: {cfg.recipe}`, not the authors' "
                    "published recipes."]
    shown, notes, not_run = {}, [], []
    for method, figures in protocol.published.items():
        records = [r.get("recipe") for r in rows if r["method"] == method and r["dataset"] in datasets]
        if not records:
            not_run.append(method)
        elif None in records:
            notes.append(f"{method} (published) is left out: some of its runs record no recipe (made before "
                         "promptlearn recorded one), so they may not have run the published recipe.")
        elif any(r["recipe"] != "published" for r in records):
            ran = sorted({r["recipe"] for r in records} - {"published"})
            notes.append(f"{method} (published) is left out: its runs used `recipe: {', '.join(ran)}`.")
        elif not all(r.get("for_backbone") for r in records):
            notes.append(f"{method} (published) is left out: no published recipe of it was applied for this backbone "
                         "and setting (promptlearn list recipes " + method + ").")
        elif any(r["changed"] for r in records):
            changed = sorted({key for r in records for key in r["changed"]})
            notes.append(f"{method} (published) is left out: its runs changed {', '.join(changed)} from the "
                         "published recipe.")
        else:
            shown[method] = figures
    if not_run:
        notes.append(f"Published figures of methods this sweep did not run are left out: {', '.join(not_run)}.")
    return shown, notes


def protocol_summary(protocol: Protocol, rows: list[dict], methods: list[str], datasets: list[str],
                     seeds: list[int], cfg: "RunConfig") -> str:
    """A protocol sweep's summary.md in the papers' layout: the average over datasets, then each dataset;
    mean ± sample std over seeds; published figures beside ours only for the papers' own setting and recipes."""
    published, left_out = published_figures(protocol, rows, datasets, cfg)
    derived = ", ".join(protocol.derived({})) or "none"
    targets = list(dict.fromkeys(t for r in rows for t in r.get("target_accuracy") or {}))
    tested = (f"Source {', '.join(datasets)} ({cfg.data.shots} shots); targets {', '.join(targets) or '-'}. "
              if protocol.default_targets else "")
    lines = [f"# Protocol {protocol.name}: accuracy (%)", "", f"{protocol.summary}.", "",
             f"{tested}Backbone {cfg.backbone.model} ({cfg.backbone.pretrained}); {cfg.data.shots} shots; "
             f"{seeds_text(seeds)}; model selection: "
             f"{SELECTION_TEXT[cfg.selection]}. Derived columns ({derived}) are computed from the mean columns, "
             "as the papers do." + (" Rows marked (published) are the papers' figures, for comparison, beside "
                                    "methods that ran the published recipe unchanged." if published else ""), "",
             *(f"- {note}" for note in left_out), *([""] if left_out else [])]
    if len(datasets) > 1:
        lines += [f"## Average over {len(datasets)} datasets", "",
                  protocol_table(protocol, rows, methods, datasets, published), ""]
    for dataset in datasets:
        lines += [f"## {dataset}", "", protocol_table(protocol, rows, methods, [dataset],
                                                      published if len(datasets) == 1 else {}), ""]
    notes = sorted({f"- {r['method']} on {r['dataset']}: {r['na']}" for r in rows if r["na"]})
    if notes:
        lines += ["## n/a", "", *notes, ""]
    return "\n".join(lines)


def seeds_text(seeds: list[int]) -> str:
    if len(seeds) == 1:
        return f"one seed ({seeds[0]}), so no spread is shown"
    return f"mean ± sample standard deviation over seeds {', '.join(map(str, seeds))}"
