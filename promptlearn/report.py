"""Comparison tables of evaluated methods."""
from __future__ import annotations


def comparison_table(metrics: dict[str, dict], title: str) -> str:
    lines = [f"### {title}", "", "| method | accuracy (%) | macro-F1 (%) | ECE (%) | train s |",
             "|---|---:|---:|---:|---:|"]
    for name, m in metrics.items():
        lines.append(f"| {name} | {m['accuracy']:.2f} | {m['macro_f1']:.2f} | {m['ece']:.2f} | "
                     f"{m.get('train_seconds', 0.0):.1f} |")
    return "\n".join(lines)
