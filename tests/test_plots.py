"""Reports and plots read at a glance: one look per method, error bars instead of bands, labels that do not
collide, no "± 0.00" from one seed, a cross-dataset summary that names its own source and targets, and a
figure per protocol in the papers' layout."""
from __future__ import annotations

from itertools import combinations
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import SAMPLE, quick_config

from promptlearn import plots
from promptlearn.config import load_config
from promptlearn.data import build_dataset
from promptlearn.protocols import PROTOCOLS
from promptlearn.report import cell_text, protocol_summary
from promptlearn.sweep import SweepConfig, curve_table, write_plots

SEVEN = ["zeroshot", "linear_probe", "coop", "coop_csc", "clip_adapter", "tip_adapter", "tip_adapter_f"]
PNG = b"\x89PNG\r\n\x1a\n"


def overlapping_texts(fig) -> list[tuple[str, str]]:
    """Pairs of the axes' own texts and legend entries whose drawn boxes overlap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    texts = [t for ax in fig.axes for t in ax.texts + (ax.get_legend().get_texts() if ax.get_legend() else [])]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_text()]
    return [(a, b) for (a, box_a), (b, box_b) in combinations(boxes, 2) if box_a.overlaps(box_b)]


def test_one_seed_prints_no_spread():
    assert cell_text((51.0, 0.0, 1)) == "51.00" and cell_text((51.0, 1.414, 2)) == "51.00 ± 1.41"
    assert curve_table({("m", 1): (40.0, 0.0, 1)}, ["m"], [1]).splitlines()[-1] == "| m | 40.00 |"
    cfg = load_config([], ["protocol=base2novel"])
    rows = [{"method": "coop", "dataset": "d", "seed": 1, "base_accuracy": 80.0, "novel_accuracy": 60.0, "na": ""}]
    text = protocol_summary(PROTOCOLS.get("base2novel"), rows, ["coop"], ["d"], [1], cfg)
    assert "| coop | 80.00 | 60.00 | 68.57 |" in text and "±" not in text.split("## d")[1]
    assert "one seed (1), so no spread is shown" in text


def test_cross_dataset_summary_names_its_source_shots_and_targets():
    cfg = load_config([], ["protocol=cross_dataset", "data.shots=4"])
    rows = [{"method": "coop", "dataset": "fashion_mnist_sample", "seed": s, "accuracy": 40.0 + s,
             "target_accuracy": {"shifted_sample": 20.0 + s}, "targets_average": 20.0 + s, "na": ""} for s in (1, 2)]
    text = protocol_summary(PROTOCOLS.get("cross_dataset"), rows, ["coop"], ["fashion_mnist_sample"], [1, 2], cfg)
    assert "ImageNet" not in text and "16-shot" not in text
    assert "Source fashion_mnist_sample (4 shots); targets shifted_sample." in text
    assert "| method | source | shifted_sample | targets average |" in text


def test_a_target_yaml_names_its_column_not_the_folder(tmp_path):
    target = tmp_path / "shifted_sample.yaml"  # the folder it reads is called "test", as a split is
    target.write_text(f"data:\n  name: image_folder\n  path: {SAMPLE / 'test'}\n")
    cfg = quick_config(tmp_path, "protocol=cross_dataset", f"targets=[{target}]")
    found = PROTOCOLS.get("cross_dataset").targets(cfg, build_dataset(cfg.data))
    assert [t.name for t in found] == ["fashion_mnist_sample", "shifted_sample"]


def test_each_method_keeps_a_look_of_its_own():
    styles = plots.method_styles(SEVEN)
    for key in ("color", "marker", "hatch"):
        assert len({s[key] for s in styles.values()}) == 7, key
    assert all(styles[a]["linestyle"] != styles[b]["linestyle"] for a, b in zip(SEVEN, SEVEN[1:]))
    assert plots.method_styles(["coop", *SEVEN])["coop"] != styles["coop"]  # by place in the sweep's list


def test_accuracy_plot_draws_error_bars_not_bands_and_tells_the_lines_apart(tmp_path):
    curve = {(m, k): (50.0, 2.0, 3) for m in SEVEN for k in (1, 2, 4)}  # seven equal lines: each must stay visible
    fig = plots.accuracy_plot(tmp_path / "a.png", "t", curve, SEVEN)
    ax = fig.axes[0]
    assert not [c for c in ax.collections if "PolyCollection" in type(c).__name__]  # no bands
    assert [c.get_label() for c in ax.containers] == SEVEN  # one line with error bars per method
    lines = [c.lines[0] for c in ax.containers]
    assert len({(line.get_marker(), line.get_linestyle(), line.get_color()) for line in lines}) == 7
    assert len({tuple(line.get_xdata()) for line in lines}) == 7  # nudged apart: no point hides another
    assert "error bars: ± std over 3 seeds" in ax.get_title()
    one_seed = plots.accuracy_plot(tmp_path / "b.png", "t", {(m, 1): (50.0, 0.0, 1) for m in SEVEN}, SEVEN)
    assert "one seed: no spread" in one_seed.axes[0].get_title()


def test_base_novel_labels_do_not_collide(tmp_path):
    close = {m: {"base": (60.0 + i * 0.3, 1.0, 2), "novel": (55.0 + i * 0.2, 1.0, 2)} for i, m in enumerate(SEVEN)}
    fig = plots.base_novel_plot(tmp_path / "b.png", close, "base2novel")
    assert overlapping_texts(fig) == []
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == SEVEN


def planned(dataset: str, protocol: str) -> SimpleNamespace:
    cfg = load_config([], [f"protocol={protocol}", "backbone.model=tiny-clip", "backbone.pretrained=none",
                           f"methods=[{', '.join(SEVEN)}]"])
    return SimpleNamespace(dataset=dataset, cfg=cfg)


@pytest.mark.parametrize("protocol, files", [
    ("fewshot", ["accuracy_average.png", "accuracy_a.png", "accuracy_b.png"]),
    ("base2novel", ["base_novel.png", "base_novel_bars.png"]),
    ("cross_dataset", ["targets.png"]),
])
def test_a_figure_per_protocol_in_the_papers_layout(tmp_path, protocol, files):
    rows = [{"method": m, "dataset": d, "seed": s, "shots": k, "accuracy": 30.0 + i + s, "base_accuracy": 40.0 + i,
             "novel_accuracy": None if m == "linear_probe" else 30.0 + s, "target_accuracy": {"t1": 20.0 + s},
             "targets_average": 20.0 + s, "na": ""}
            for i, m in enumerate(SEVEN) for d in ("a", "b") for s in (1, 2) for k in (1, 2)]
    sweep = SweepConfig(datasets=["a", "b"], shots=[1, 2], seeds=[1, 2], output_dir=str(tmp_path))
    written = write_plots(sweep, [planned("a", protocol), planned("b", protocol)], rows, PROTOCOLS.get(protocol))
    assert [Path(p).name for p in written] == files
    assert all(Path(p).read_bytes()[:8] == PNG for p in written)
