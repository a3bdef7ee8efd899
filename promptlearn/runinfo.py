"""What every run folder records beside its results (run_info.json): the environment (promptlearn, torch,
open_clip and Python versions, device, precision), wall-clock per phase and peak memory; the feature bank adds
what it encoded and how fast (FeatureBank.extraction_record)."""
from __future__ import annotations

import platform
import resource
import sys
import time
from contextlib import contextmanager

import torch

import promptlearn

PHASES = ("feature_extraction", "training", "evaluation")


def environment(device: torch.device, precision: str) -> dict:
    import open_clip

    env = {"promptlearn": promptlearn.__version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
           "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
           "precision": precision}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def peak_memory(device: torch.device) -> dict:
    """Peak resident memory of this process (MiB, since it started) and, on CUDA, peak allocated GPU memory."""
    # ru_maxrss is in KiB on Linux and in bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    peak = {"peak_rss_mib": round(rss, 1)}
    if device.type == "cuda":
        peak["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return peak


class PhaseClock:
    """Wall-clock per phase. Features are encoded lazily (inside training or evaluation), so the time the
    feature bank spent encoding during a phase is moved from that phase to feature_extraction."""

    def __init__(self, bank):
        self.bank = bank
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name: str, into: dict | None = None):
        """Time `name`; `into` (a method's entry) also receives the phase's seconds."""
        began, encoded = time.perf_counter(), self.bank.extract_seconds
        try:
            yield
        finally:
            extracted = self.bank.extract_seconds - encoded
            spent = time.perf_counter() - began - extracted
            self.seconds[name] += spent
            self.seconds["feature_extraction"] += extracted
            if into is not None:
                into[f"{name}_seconds"] = round(into.get(f"{name}_seconds", 0.0) + spent, 3)
                into["feature_extraction_seconds"] = round(into.get("feature_extraction_seconds", 0.0) + extracted, 3)

    def record(self) -> dict:
        return {name: round(s, 3) for name, s in self.seconds.items()}
