"""Benchmark of the methods that learn inside the towers: time per training step and peak memory per
method at 224 px on a ViT-B/16-sized CLIP (random weights), beside a straightforward loop that does
what the authors' code does (the prompted towers written out block by block, tokens concatenated and
replaced in the loop). Each measurement runs in its own process, so the CPU's peak resident memory
is that method's alone.

    python -m promptlearn.deep_benchmark --out benchmarks/cpu-vitb16-deep-prompts.json
"""
from __future__ import annotations

import argparse
import multiprocessing
import queue as queue_module
import statistics
import sys
import tempfile
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from promptlearn.backbone import load_backbone
from promptlearn.benchmark import clock, device_name, memory_facts, peak_memory_mb
from promptlearn.config import load_config
from promptlearn.io import atomic_write_json
from promptlearn.methods import build_method
from promptlearn.methods.ivlp import DeepPromptMethod
from promptlearn.trainer import build_optimizer, optimizer_step

METHODS = ["vpt_deep", "ivlp", "maple", "promptsrc", "clip_lora"]
CLASSNAMES = [f"class {i}" for i in range(10)]


def reference_image_features(method: DeepPromptMethod, images: torch.Tensor) -> torch.Tensor:
    """The authors' prompted image encoder as a plain loop: prompts appended after the positional
    embedding, replaced before each block up to the depth, the class token read at the end."""
    visual, prompts = method.visual, method.vision_prompt_list()
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(len(x), 1, -1), x], dim=1) + visual.positional_embedding
    n = prompts[0].shape[0] if prompts else 0
    if n:
        x = torch.cat([x, prompts[0].expand(len(x), -1, -1)], dim=1)
    x = visual.ln_pre(x)
    for i, block in enumerate(visual.transformer.resblocks):
        if 0 < i < len(prompts):
            x = torch.cat([x[:, :-n], prompts[i].expand(len(x), -1, -1)], dim=1)
        x = block(x)
    return F.normalize(visual.ln_post(x[:, 0]) @ visual.proj, dim=-1)


def reference_text_features(method: DeepPromptMethod) -> torch.Tensor:
    """The authors' prompted text encoder as a plain loop: the context replaced before each block."""
    text, tower = method.text, method.backbone.text
    deep, start = method.text_deep_list(), text.start
    x = text.embeddings() + tower.positional_embedding[:text.token_ids.shape[1]]
    mask = tower.attn_mask[:x.shape[1], :x.shape[1]] if tower.causal else None
    for i, block in enumerate(tower.transformer.resblocks):
        if 0 < i <= len(deep):
            p = deep[i - 1]
            x = torch.cat([x[:, :start], p.expand(len(x), -1, -1), x[:, start + len(p):]], dim=1)
        x = block(x, attn_mask=mask)
    x = tower.ln_final(x)
    pooled = x[torch.arange(len(x)), tower.pooled_positions(text.token_ids)]
    return F.normalize(tower._project(pooled), dim=-1)


def _measure(name: str, model: str, reference: bool, checkpointing: bool, batch: int, steps: int,
             overrides: list[str], queue) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config([], [f"backbone.model={model}", "backbone.pretrained=none", f"output_dir={tmp}",
                               f"{name}.grad_checkpointing={checkpointing}", *overrides])
    backbone = load_backbone(cfg.backbone)
    after_load = peak_memory_mb(backbone.device)
    method = build_method(name, cfg, backbone, CLASSNAMES).train()
    optimizer = build_optimizer([p for p in method.parameters() if p.requires_grad], method.train_config)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    size = backbone.image_size
    images = torch.randn(batch, 3, size, size, device=backbone.device)
    labels = torch.arange(batch, device=backbone.device) % len(CLASSNAMES)

    if reference:  # the method's own loss (PromptSRC's terms included) on the plain-loop towers
        method.encode_images = lambda x: reference_image_features(method, x)
        method.text_features = lambda: reference_text_features(method)

    def step() -> None:
        optimizer_step(method, method.training_step(images, labels).losses, optimizer, scaler)

    step()  # warm-up
    stamps = [clock(backbone.device)]
    for _ in range(steps):
        step()
        stamps.append(clock(backbone.device))
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    queue.put({"image_size": size, "time_per_step_s": statistics.median(times), "measured_steps": steps,
               **memory_facts(backbone.device, after_load)})


def measure(name: str, model: str, reference: bool, checkpointing: bool, batch: int, steps: int,
            overrides: list[str]) -> dict:
    """One measurement in a fresh process (its peak memory is its own)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(name, model, reference, checkpointing, batch, steps, overrides, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=1)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the {name} measurement process died (exit status {proc.exitcode}); "
                                   "its error is printed above") from None
    proc.join()
    return result


def run(model: str = "ViT-B-16", batch: int = 4, steps: int = 2, methods: list[str] = METHODS,
        overrides: list[str] = (), checkpointing: bool = False, out: Path | None = None) -> dict:
    """Figures per method; with `out`, the JSON is rewritten after each method (a long run keeps
    what it has measured)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"device": device_name(torch.device(device)), "torch": torch.__version__,
              "open_clip": open_clip.__version__, "backbone": model, "pretrained": "none",
              "classes": len(CLASSNAMES), "batch_size": batch, "methods": {},
              "note": "each measurement in its own process; the recipes' default prompt lengths and depths"}
    for name in methods:
        own = measure(name, model, reference=False, checkpointing=False, batch=batch, steps=steps,
                      overrides=list(overrides))
        entry = {"promptlearn": own}
        if checkpointing:
            saved = measure(name, model, reference=False, checkpointing=True, batch=batch, steps=steps,
                            overrides=list(overrides))
            entry["promptlearn_grad_checkpointing"] = saved
            entry["memory_ratio_checkpointing_over_plain"] = saved["peak_memory_mb"] / own["peak_memory_mb"]
        if name != "clip_lora":  # CLIP-LoRA's own code is the same per-projection arithmetic as promptlearn.lora
            ref = measure(name, model, reference=True, checkpointing=False, batch=batch, steps=steps,
                          overrides=list(overrides))
            entry["reference_loop"] = ref
            entry["time_ratio_reference_over_promptlearn"] = ref["time_per_step_s"] / own["time_per_step_s"]
        result["methods"][name] = entry
        if out is not None:
            atomic_write_json(out, result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpointing", action="store_true", help="also measure with gradient checkpointing")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. maple.depth_vision=2")
    args = parser.parse_args(argv)
    run(args.model, args.batch, args.steps, args.methods, args.overrides, args.checkpointing, args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
