"""tools/benchmark.py in quick mode on a tiny backbone: it writes its JSON with both paths measured and
the same logits at the same context. Timings are machine facts, not asserted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import HANG_GUARD_S

from promptlearn.benchmark import BenchmarkSpec, benchmark_class_names, class_names

REPO = Path(__file__).resolve().parent.parent
PATH_FIELDS = {"precision", "prompt_length", "time_per_step_s", "measured_steps", "full_run_s",
               "peak_memory_mb", "memory_after_load_mb", "memory_kind"}


@pytest.mark.slow
@pytest.mark.subprocess
def test_quick_benchmark_writes_both_paths_and_equal_logits(tmp_path):
    out = tmp_path / "bench" / "result.json"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark.py"), "--quick", "--model", "tiny-clip",
                          "--classes", "3", "--shots", "4", "--device", "cpu", "--class-names", "imagenet", "--num-workers", "1",
                          "--output", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"].startswith("CPU") and result["backbone"] == "tiny-clip" and result["quick"]
    assert (result["classes"], result["shots"], result["train_images"]) == (3, 4, 12)
    assert result["epochs"] == 100 and result["steps_per_epoch"] == 1 and result["total_steps"] == 100
    reference, ours = result["reference"], result["promptlearn"]
    assert PATH_FIELDS <= reference.keys() and PATH_FIELDS <= ours.keys()
    assert reference["prompt_length"] == 77 and ours["prompt_length"] < 77 and ours["shared_prefix_length"] == 17
    assert reference["text_rows_per_step"] == 3 * 77 and 17 + 3 * 3 <= ours["text_rows_per_step"] < 17 + 3 * 60
    for path in (reference, ours):
        assert path["time_per_step_s"] > 0 and path["peak_memory_mb"] > 0 and path["memory_kind"] == "peak RSS"
        assert path["full_run_s"] > 0
    assert ours["full_run_s"] == ours["feature_extraction_s"] + ours["training_s"]
    assert ours["text_tower_flops_per_step"] > 0 and ours["device_peak_tflops"] is None  # no peak on a CPU
    assert result["speedup"] == reference["full_run_s"] / ours["full_run_s"]
    assert result["max_logit_difference"] == result["max_logit_diff"] < 1e-4
    assert result["class_names"] == "imagenet" and result["text_flop_ratio"] > 2
    assert result["text_step_speedup"] == reference["text_tower_s_per_step"] / ours["text_tower_s_per_step"]
    assert "speed-up" in run.stdout


def test_spec_extrapolates_the_protocol_run():
    spec = BenchmarkSpec(classes=1000, shots=16, protocol="imagenet")
    assert (spec.train_images, spec.run_epochs, spec.steps_per_epoch) == (16000, 50, 500)
    assert BenchmarkSpec(classes=10, shots=16).run_epochs == 200
    assert len(set(class_names(1200))) == 1200
    assert benchmark_class_names("imagenet", 3) == ["tench", "goldfish", "great white shark"]


def test_the_full_run_benchmark_runs_coop_on_an_imagenet_layout_with_the_real_names(tmp_path):
    """`promptlearn benchmark-full-run` end to end on a tiny backbone: the dataset it writes is read by the
    ImageNet reader with CLIP's class names, the run trains every step of its epochs, and the JSON sets
    it beside a benchmark JSON's reference figures."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from promptlearn.full_run import FullRunSpec, run_full, write_imagenet_layout

    spec = FullRunSpec(model="tiny-clip", classes=8, shots=4, train_per_class=5, test_per_class=1, unique_images=4,
                       num_workers=0, epochs=3)
    write_imagenet_layout(tmp_path / "layout", spec)
    listing = (tmp_path / "layout" / "imagenet" / "classnames.txt").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in listing] == list(IMAGENET_CLASSNAMES[:8])
    assert len(list((tmp_path / "layout" / "imagenet" / "images" / "train").glob("*/*.JPEG"))) == 40

    beside = {"reference": {"time_per_step_s": 2.0, "full_run_s": 1e4}, "max_logit_diff": 1e-6}
    result = run_full(spec, tmp_path / "work", beside)
    assert (result["classes"], result["class_names"], result["epochs"]) == (8, "imagenet", 3)
    assert result["total_steps"] == 3  # 32 training images: one batch of 32 per epoch
    assert result["run_info"]["environment"]["precision"] == "fp32" and result["run_wall_s"] > 0
    assert result["speedup"] == 1e4 / result["run_wall_s"] and result["max_logit_diff"] == 1e-6


def children(parent: int, marker: str) -> list[int]:
    """Live processes whose parent is `parent` and whose command line holds `marker` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == parent and fields[0] != "Z" and marker in cmdline:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


@pytest.mark.subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_benchmark_takes_its_measuring_process_with_it():
    parent = subprocess.Popen([sys.executable, "-c", "import time; from promptlearn.benchmark import in_own_process; "
                               f"in_own_process(time.sleep, {2 * HANG_GUARD_S})"], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + HANG_GUARD_S  # hang guards only: imports on a busy machine take a while
        while not (measuring := children(parent.pid, "spawn_main")):
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + HANG_GUARD_S  # the child sleeps longer: only its parent's death ends it sooner
    while alive(measuring[0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    ended = not alive(measuring[0])
    if not ended:
        os.kill(measuring[0], signal.SIGKILL)
    assert ended
