"""Result tables: one run's table in its protocol's layout."""
from __future__ import annotations

from promptlearn.protocols import SELECTION_TEXT, Protocol


def cell(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


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
        cells = " | ".join(cell(metric(m, key)) for key, _ in columns)
        lines.append(f"| {name} | {cells} | {m.get('train_seconds', 0.0):.1f} |")
        notes += [f"- {name}, {where}: n/a, {why}" for where, why in m.get("na", {}).items()]
    return "\n".join(lines + ([""] + notes if notes else []))
