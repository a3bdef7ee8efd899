"""A clear answer to every bad input: images, class folders and names, configs, split files,
checkpoints and a loss that blows up. The command line answers with exit status 2 and one
`error: ...` line on stderr, never a traceback; several cases run tools/train_coop.py for real."""
from __future__ import annotations

import io
import json
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures_data import make_oxford_pets, write_class_folders, write_lines
from helpers import QUICKSTART, SAMPLE, quick_config, tiny_backbone
from PIL import Image

from promptlearn.checkpoint import FORMAT, content_digest, load_checkpoint, save_checkpoint
from promptlearn.config import load_config
from promptlearn.data.base import DatasetSplits, Item
from promptlearn.data.loader import BadImage, ImageItems, load_image
from promptlearn.data.transforms import eval_transform
from promptlearn.errors import CheckpointError, DataError, NonFinite, PromptlearnError
from promptlearn.features import EpochFeatures, SplitFeatures
from promptlearn.methods import build_method
from promptlearn.protocols import Target, evaluate_on
from promptlearn.runner import run_experiment
from promptlearn.trainer import NonFiniteLoss, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
LONG_NAME = "very " * 80 + "long coat"  # ~82 tokens: no prompt with it fits a 77-token tower


# ----------------------------------------------------------------------------- builders

def image_bytes(fmt: str, size: int = 64) -> bytes:
    """Noise, so that compressed data fills the file and a cut lands inside the pixels."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (size, size, 3), np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG file that claims to be width x height: a decompression bomb as Pillow sees it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def flipped_png() -> bytes:
    data = bytearray(image_bytes("PNG"))
    data[data.find(b"IDAT") + 40] ^= 0xFF
    return bytes(data)


BAD_FILES = {  # name: (contents, what Pillow says)
    "zero-byte.png": (b"", "cannot identify image file"),
    "truncated.png": (image_bytes("PNG")[:3000], "[Tt]runcated"),
    "truncated.jpg": (image_bytes("JPEG")[:600], "[Tt]runcated"),
    "corrupt.png": (flipped_png(), "broken data stream"),
    "not-an-image.jpg": (b"<html>this is a web page saved as .jpg</html>", "cannot identify image file"),
}


def split_folder(root: Path, classes: list[str], train: int = 2, test: int = 1) -> Path:
    """root/train/<class>/ and root/test/<class>/ with tiny PNG images."""
    write_class_folders(root / "train", {c: train for c in classes})
    write_class_folders(root / "test", {c: test for c in classes})
    return root


class RunsCode:
    """Unpickling this creates `marker`: a stand-in for any code hidden in a pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def sample_classnames() -> list[str]:
    return [line.split("\t")[1] for line in (SAMPLE / "classnames.txt").read_text().splitlines() if "\t" in line]


# ----------------------------------------------------------------------------- the tool, for real

def _subprocess_cases(base: Path) -> dict[str, tuple[list[str], Path | None]]:
    """name: (arguments, a file that must not appear). Inputs are built under `base`."""
    common = [f"cache_dir={base / 'cache'}"]
    corrupt = split_folder(base / "corrupt", ["coat", "shirt"])
    (corrupt / "test" / "shirt" / "truncated.png").write_bytes(BAD_FILES["truncated.png"][0])
    empty = split_folder(base / "empty", ["rose", "daisy"])
    (empty / "train" / "tulip").mkdir()
    long_name = split_folder(base / "long", ["coat", "shirt"])
    write_lines(long_name / "classnames.txt", [f"coat\t{LONG_NAME}"])
    marker = base / "code-ran"
    torch.save({"format": FORMAT, "state": RunsCode(marker)}, base / "evil.pt")
    other = base / "other-backbone"
    save_checkpoint(other / "coop" / "checkpoint.pt", {
        "meta": {"method": "coop", "model": "ViT-B-32", "pretrained": "openai", "classnames": sample_classnames()},
        "state": {"prompts.ctx": torch.zeros(10, 4, 512)}, "epoch": 3})
    return {
        "unknown key": (["--output-dir", str(base / "o1"), "train.epoch=3", *common], None),
        "corrupt image": (["--output-dir", str(base / "o2"), f"data.path={corrupt}", "data.shots=2", *common], None),
        "empty class folder": (["--output-dir", str(base / "o3"), f"data.path={empty}", *common], None),
        "long class name": (["--output-dir", str(base / "o4"), f"data.path={long_name}", "data.shots=2", *common],
                            None),
        "pickled code": (["--eval-only", str(base / "evil.pt"), "--output-dir", str(base / "o5"),
                          "methods=[coop]", *common], marker),
        "other backbone": (["--resume", "--output-dir", str(other), "methods=[coop]", *common], None),
    }


SUBPROCESS_ERRORS = {
    "unknown key": r"error: command line: unknown config key 'train\.epoch'; did you mean 'train\.epochs'\?",
    "corrupt image": r"error: image \S+/test/shirt/truncated\.png cannot be read \(OSError: .*[Tt]runcated.*\); it may be "
                     r"corrupt, truncated or not an image\. Remove it or set data\.skip_bad_images=true",
    "empty class folder": r"error: class folder \S+/train/tulip holds no images; add the images of class 'tulip' .*",
    "long class name": rf"error: the prompt 'a photo of a {LONG_NAME}, a type of clothing\.' is \d+ tokens, more "
                       r"than the text tower's context length 77; shorten the class name in it or the template",
    "pickled code": r"error: checkpoint \S+/evil\.pt was refused: it holds pickled objects or code, which a "
                    r"weights-only load never runs \(it names \S*open\)\. Only load checkpoints you trust.*",
    "other backbone": r"error: checkpoint \S+/coop/checkpoint\.pt does not match this setup: model: 'ViT-B-32' in the "
                      r"checkpoint, 'tiny-clip' now; pretrained: 'openai' in the checkpoint, 'none' now.*",
}


@pytest.fixture(scope="module")
def tool_runs(tmp_path_factory, train_coop):
    """Every subprocess case, two at a time: they spend most of their time importing torch, and more at
    once than there are cores only slows each of them down."""
    cases = _subprocess_cases(tmp_path_factory.mktemp("tool"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        finished = pool.map(lambda args: train_coop.run(*args), [args for args, _ in cases.values()])
        return {name: (done, marker) for (name, (_, marker)), done in zip(cases.items(), finished)}


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("case", list(SUBPROCESS_ERRORS))
def test_tool_answers_bad_input_with_one_error_line_and_status_2(tool_runs, case):
    finished, must_not_exist = tool_runs[case]
    assert re.fullmatch(SUBPROCESS_ERRORS[case], finished.error()), finished.error()
    if must_not_exist is not None:
        assert not must_not_exist.exists()


# ----------------------------------------------------------------------------- the tool, in this process

@pytest.fixture
def tool_error(train_coop, capsys):
    """The error line of tools/train_coop.py's main run in this process, as the command line runs it."""
    return lambda *args: train_coop.call(capsys, *args).error()


@pytest.mark.parametrize("args, message", [
    (["data.shots=many"], r"command line: data\.shots must be an integer, got 'many'"),
    (["train.augment=maybe"], r"command line: train\.augment must be true or false, got 'maybe'"),
    (["train.lr=[0.1]"], r"command line: train\.lr must be a number, got \[0\.1\]"),
    (["coop.nctx=4"], r"command line: unknown config key 'coop\.nctx'; did you mean 'coop\.n_ctx'\?"),
    (["--shots", "0"], r"data\.shots must be at least 1, got 0"),
    (["data.shots=-4"], r"data\.shots must be at least 1, got -4"),
    (["coop.n_ctx=0", "coop.ctx_init="],
     r"coop\.n_ctx must be at least 1, got 0 \(or set coop\.ctx_init to a phrase\)"),
    (["--epochs", "-1"], r"train\.epochs must be 0 or more, got -1"),
    (["train.max_steps=1000000000000000000000000000000"],  # an islice traceback after the first method trained
     r"train\.max_steps must be at most 2147483647, got 10{30}"),
    (["methods=[cocoop]", "cocoop.batch_size=0"], r"cocoop\.batch_size must be at least 1, got 0"),  # was 1/0
])
def test_bad_config_values(tool_error, args, message):
    assert re.fullmatch(f"error: {message}", tool_error(*args))


@pytest.mark.parametrize("yaml_text, message", [
    ("trian:\n  lr: 0.1\n", r"\S+/bad\.yaml: unknown config key 'trian\.lr'; did you mean 'train\.lr'\?"),
    ("coop:\n  n_ctx: four\n", r"\S+/bad\.yaml: coop\.n_ctx must be an integer, got 'four'"),
    ("train: [1, 2\n", r"config file \S+/bad\.yaml is not valid YAML: .*"),  # a multi-line message, on one line
    ("".join(f"l{i}: &l{i} {{a: *l{i - 1}, b: *l{i - 1}}}\n" if i else "l0: &l0 {x: 1}\n" for i in range(16)),
     r"\S+/bad\.yaml, line 2: \*l0 repeats a mapping; config files take no aliases of mappings .*"),  # 2**16 keys flattened
])
def test_bad_config_files(tmp_path, tool_error, yaml_text, message):
    (tmp_path / "bad.yaml").write_text(yaml_text)
    assert re.fullmatch(f"error: {message}", tool_error("--config", str(tmp_path / "bad.yaml")))


def test_init_phrase_longer_than_the_context_allows(tmp_path, tool_error):
    phrase = " ".join(["photo"] * 80)
    error = tool_error("--output-dir", str(tmp_path / "run"), "methods=[coop]", f"coop.ctx_init={phrase}",
                       f"cache_dir={tmp_path / 'cache'}")
    assert re.fullmatch(r"error: the prompt for class 'ankle boot' is \d+ tokens \(80 of them context\), more than the "
                        r"text tower's context length 77; shorten the class name, or the context \(a shorter "
                        r"coop\.ctx_init phrase or a smaller coop\.n_ctx\)", error)


@pytest.mark.parametrize("rows, message", [
    ([["a.png", 0, "cat"], ["b.png", 0, "dog"]], r"label 0 is named both 'cat' and 'dog' \(test\[1\]\); give each "
                                                 r"label one class name"),
    ([["a.png", 0, "cat"], ["b.png", 1, "cat"]], r"class 'cat' has the labels 0 and 1 \(test\[1\]\)"),
    ([["a.png", 0, "cat"], ["b.png", 5, "dog"]], r"labels must run from 0 to 5 without gaps, but no item has label "
                                                 r"1, 2, 3, 4; renumber the labels 0\.\.1"),
    ([["a.png", -1, "cat"]], r"test\[0\] has label -1; labels must be 0 or more"),
])
def test_split_file_with_duplicate_or_out_of_range_labels(tmp_path, tool_error, rows, message):
    make_oxford_pets(tmp_path / "data", {"train": [], "val": [], "test": rows})
    error = tool_error("--dataset", "oxford_pets", "--data-root", str(tmp_path / "data"),
                       "--output-dir", str(tmp_path / "run"))
    assert re.fullmatch(rf"error: \S+/split_zhou_OxfordPets\.json: {message}.*", error)


# ----------------------------------------------------------------------------- images

@pytest.mark.parametrize("name", list(BAD_FILES))
def test_unreadable_image_is_named(tmp_path, name):
    contents, reason = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(contents)
    with pytest.raises(DataError, match=rf"image {re.escape(str(path))} cannot be read \(.*{reason}.*\); it may be "
                                        r"corrupt, truncated or not an image"):
        load_image(str(path))
    bad = ImageItems([Item(str(path), 0, "x")], transform=lambda img: img)[0]  # a record, not a crash in a worker
    assert isinstance(bad, BadImage) and name in bad.message


def test_a_corrupt_test_image_stops_the_run_before_anything_loads(tmp_path, monkeypatch):
    root = split_folder(tmp_path / "data", ["coat", "shirt"], train=2, test=3)
    (root / "test" / "coat" / "corrupt.png").write_bytes(BAD_FILES["corrupt.png"][0])
    (root / "test" / "shirt" / "truncated.jpg").write_bytes(BAD_FILES["truncated.jpg"][0])

    def nothing_loads(*args):
        raise AssertionError("the backbone loaded: images are checked first")

    monkeypatch.setattr("promptlearn.runner.load_backbone", nothing_loads)
    cfg = quick_config(tmp_path, f"data.path={root}", "data.shots=2", "methods=[linear_probe,zeroshot]")
    with pytest.raises(DataError, match=r"image \S+/test/coat/corrupt\.png cannot be read \(SyntaxError: broken PNG"
                                        r".* \(1 more images cannot be read\)$"):
        run_experiment(cfg)


def test_bad_images_are_skipped_and_counted_when_asked(tmp_path, caplog):
    root = split_folder(tmp_path / "data", ["coat", "shirt"], train=2, test=3)
    for name in ("zero-byte.png", "truncated.jpg", "not-an-image.jpg"):
        (root / "test" / "coat" / name).write_bytes(BAD_FILES[name][0])
    (root / "test" / "shirt" / "notes.txt").write_text("not an image name: never listed")
    (root / "test" / "shirt" / ".DS_Store").write_bytes(b"\0\1")
    cfg = quick_config(tmp_path, f"data.path={root}", "data.shots=2", "methods=[zeroshot]")
    with pytest.raises(DataError, match=r"test/coat/not-an-image\.jpg cannot be read"):  # the first bad one
        run_experiment(cfg)
    cfg.data.skip_bad_images = True
    metrics = run_experiment(cfg)
    assert metrics["zeroshot"]["num_test_images"] == 6
    assert "test features: skipped 3 unreadable images (data.skip_bad_images=true)" in caplog.text


def _image(mode: str, tmp_path: Path) -> Path:
    gradient = np.arange(64, dtype=np.uint16).reshape(8, 8)
    images = {
        "L": (Image.new("L", (8, 8), 128), "png"),
        "LA": (Image.new("LA", (8, 8), (10, 0)), "png"),
        "RGBA": (Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "png"),
        "P": (Image.new("RGB", (8, 8), (0, 255, 0)).convert("P"), "png"),
        "P+transparency": (Image.new("P", (8, 8), 0), "png"),
        "CMYK": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "jpg"),
        "I;16": (Image.fromarray(gradient * 1000), "png"),
        "F": (Image.fromarray(gradient.astype(np.float32) / 63), "tiff"),
        "1": (Image.new("1", (8, 8), 1), "png"),
    }
    img, ext = images[mode]
    path = tmp_path / f"{mode.replace(';', '').replace('+', '-')}.{ext}"
    img.save(path, **({"transparency": 0} if mode == "P+transparency" else {}))
    with Image.open(path) as check:
        assert check.mode == mode.split("+")[0]  # the file really is in that mode
    return path


@pytest.mark.parametrize("mode, corner", [
    ("L", (128, 128, 128)), ("LA", (255, 255, 255)), ("RGBA", (255, 255, 255)), ("P", (0, 255, 0)),
    ("P+transparency", (255, 255, 255)), ("CMYK", (255, 0, 0)), ("I;16", (0, 0, 0)), ("F", (0, 0, 0)),
    ("1", (255, 255, 255)),
])
def test_every_image_mode_is_converted_not_rejected(tmp_path, mode, corner):
    img = load_image(str(_image(mode, tmp_path)))
    pixels = np.asarray(img)
    assert img.mode == "RGB" and img.size == (8, 8)
    assert tuple(pixels[0, 0]) == corner  # transparency onto white, CMYK to RGB
    if mode in ("I;16", "F"):  # high bit depth is rescaled to the full 8-bit range, not clipped
        assert tuple(pixels[-1, -1]) == (255, 255, 255) and len(np.unique(pixels)) > 32


def test_converted_images_go_through_the_backbone_transform(tmp_path):
    modes = ["L", "RGBA", "P+transparency", "CMYK", "I;16"]
    items = [Item(str(_image(mode, tmp_path)), 0, "x") for mode in modes]
    dataset = ImageItems(items, eval_transform(tiny_backbone()))
    for i in range(len(items)):
        x, label, index = dataset[i]
        assert x.shape == (3, 32, 32) and index == i and torch.isfinite(x).all()


@pytest.mark.parametrize("side", [100_000, 10_000])  # beyond Pillow's error limit; between its warning and error
def test_decompression_bomb_is_refused_before_decoding(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(side, side))
    with pytest.raises(DataError, match=rf"image {re.escape(str(path))} is too large to decode safely \(Image size "
                                        rf"\({side * side} pixels\) exceeds limit .*\); resize it or remove it"):
        load_image(str(path))


# ----------------------------------------------------------------------------- class names

def test_non_ascii_class_names_run_end_to_end(tmp_path):
    folders = ["café", "naïve_ü", "日本語", "Ελληνικά"]
    root = split_folder(tmp_path / "data", folders)
    cfg = quick_config(tmp_path, f"data.path={root}", "data.shots=2", "train.epochs=2", "methods=[zeroshot, coop]")
    metrics = run_experiment(cfg)
    names = ["café", "naïve ü", "Ελληνικά", "日本語"]  # sorted folder order; underscores read as spaces
    assert list(metrics["coop"]["per_class_accuracy"]) == names
    header = (tmp_path / "run" / "coop" / "confusion_matrix.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header.split(",")[1:] == names
    assert load_checkpoint(tmp_path / "run" / "coop" / "checkpoint.pt")["meta"]["classnames"] == names
    assert json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))["zeroshot"]["accuracy"] >= 0


def test_class_name_too_long_for_the_context_is_named(tmp_path):
    root = split_folder(tmp_path / "data", ["coat", "shirt"])
    write_lines(root / "classnames.txt", [f"coat\t{LONG_NAME}"])
    cfg = quick_config(tmp_path, f"data.path={root}", "data.shots=2", "methods=[coop]")
    with pytest.raises(PromptlearnError, match=rf"the prompt for class '{LONG_NAME}' is \d+ tokens \(4 of them "
                                               r"context\), more than the text tower's context length 77"):
        run_experiment(cfg)


# ----------------------------------------------------------------------------- checkpoints

def _coop(model: str = "tiny-clip", classnames=("cat", "dog"), *overrides: str):
    cfg = load_config([QUICKSTART], ["coop.class_specific=false", *overrides])
    return build_method("coop", cfg, tiny_backbone(model), list(classnames))


CSC = "coop.class_specific=true"


@pytest.mark.parametrize("trained_with, other, message", [
    ((), lambda: _coop("tiny-custom-clip"), r"model: 'tiny-clip' in the checkpoint, 'tiny-custom-clip' now"),
    ((CSC,), lambda: _coop("tiny-clip", ("cat", "cow"), CSC),
     r"classnames: 2 vs 2 entries; first differences 'dog' vs 'cow'"),
    ((), lambda: _coop("tiny-clip", ("cat", "dog"), "coop.ctx_init=", "coop.n_ctx=8"),
     r"n_ctx: 4 in the checkpoint, 8 now"),
])
def test_checkpoint_from_another_backbone_class_list_or_context_size(tmp_path, trained_with, other, message):
    path = tmp_path / "checkpoint.pt"
    trained = _coop("tiny-clip", ("cat", "dog"), *trained_with)
    save_checkpoint(path, {"meta": trained.checkpoint_meta(), "state": trained.trainable_state(), "epoch": 1})
    with pytest.raises(CheckpointError, match=rf"checkpoint {re.escape(str(path))} does not match this setup: .*"
                                              rf"{message}"):
        other().restore(path)


def test_a_unified_context_fits_another_class_list(tmp_path):
    path = tmp_path / "checkpoint.pt"
    trained = _coop()
    save_checkpoint(path, {"meta": trained.checkpoint_meta(), "state": trained.trainable_state(), "epoch": 1})
    other = _coop("tiny-clip", ("cat", "cow", "hen"))
    other.restore(path)
    assert torch.equal(other.prompts.ctx.detach(), trained.prompts.ctx.detach())


def test_checkpoint_with_pickled_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    cfg = quick_config(tmp_path, "methods=[coop]", "train.epochs=1")
    checkpoint = tmp_path / "run" / "coop" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"format": FORMAT, "state": RunsCode(marker), "checksum": "x"}, checkpoint)
    with pytest.raises(CheckpointError, match=r"was refused: it holds pickled objects or code"):
        load_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match=r"was refused"):  # on --resume too: refused, not set aside as damaged
        run_experiment(cfg, resume=True)
    assert checkpoint.exists() and not checkpoint.with_name("checkpoint.pt.damaged").exists()
    assert not marker.exists()


# ----------------------------------------------------------------------------- the loss

class BlowsUpAtEpoch(EpochFeatures):
    """Training features that turn into NaN from epoch `bad` on (0-based)."""

    draw = {"dataset": "synthetic", "shots": 4}

    def __init__(self, dim: int, bad: int):
        self.dim, self.bad = dim, bad

    def epoch(self, e: int) -> SplitFeatures:
        x = F.normalize(torch.randn(8, self.dim, generator=torch.Generator().manual_seed(e)), dim=-1)
        if e >= self.bad:
            x[:] = float("nan")
        return SplitFeatures(x, torch.arange(8) % 2, [f"{i}.png" for i in range(8)])


@pytest.mark.parametrize("checkpoint_every", [1, 5])
def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_state(tmp_path, checkpoint_every):
    method = _coop()
    cfg = load_config([QUICKSTART], ["train.batch_size=4", f"train.checkpoint_every={checkpoint_every}"])
    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(NonFiniteLoss, match=r"coop: the loss became nan at epoch 3, step 1; training stopped and the "
                                            r"parameters went back to the state after epoch 2, which the checkpoint "
                                            r"keeps\. Try a lower train\.lr"):
        Trainer(cfg.train, epochs=5, seed=1).fit(method, BlowsUpAtEpoch(method.backbone.embed_dim, 2), checkpoint)
    saved = load_checkpoint(checkpoint)
    assert saved["epoch"] == 2 and len(saved["history"]) == 2
    assert torch.isfinite(saved["state"]["prompts.ctx"]).all() and torch.isfinite(method.prompts.ctx).all()
    assert isinstance(NonFiniteLoss("x"), PromptlearnError)  # the tools print it alone and exit with status 2


def test_a_loss_not_finite_before_any_update_blames_the_inputs_not_the_learning_rate(tmp_path):
    method = _coop()
    cfg = load_config([QUICKSTART], ["train.batch_size=4"])
    with pytest.raises(NonFiniteLoss, match=r"the loss became nan at epoch 1, step 1; .* It was so before any update, "
                                            r"so not the learning rate: the training inputs"):
        Trainer(cfg.train, epochs=2, seed=1).fit(method, BlowsUpAtEpoch(method.backbone.embed_dim, 0),
                                                 tmp_path / "checkpoint.pt")


@pytest.mark.parametrize("name, overrides, key", [
    ("kgcoop", [], "kgcoop.lr"), ("cocoop", ["cocoop.lr=null"], "train.lr"), ("coop", [], "train.lr"),
    ("coop", ["recipe=published"], "coop.lr"), ("coop", ["recipe=published", "train.lr=0.01"], "train.lr"), ("tip_adapter_f", [], "tip_adapter_f.lr"), ("clip_adapter", [], "train.lr"),
    ("clip_adapter", ["clip_adapter.lr=0.01"], "clip_adapter.lr"), ("clip_lora", [], "clip_lora.lr"),
])
def test_divergence_advice_names_the_key_that_set_the_learning_rate(name, overrides, key):
    cfg = load_config([QUICKSTART], overrides)
    assert build_method(name, cfg, tiny_backbone(), ["cat", "dog"]).lr_key == key


def test_a_diverging_method_with_its_own_lr_is_told_to_lower_that_key(tmp_path):
    cfg = load_config([QUICKSTART], ["train.batch_size=4", "coop.class_specific=false"])
    method = build_method("kgcoop", cfg, tiny_backbone(), ["cat", "dog"])
    with pytest.raises(NonFiniteLoss, match=r"kgcoop: the loss became nan at epoch 2, step 1; .* Try a lower "
                                            r"kgcoop\.lr or backbone\.precision=fp32"):
        Trainer(cfg.train, epochs=3, seed=1).fit(method, BlowsUpAtEpoch(method.backbone.embed_dim, 1),
                                                 tmp_path / "checkpoint.pt")


# ----------------------------------------------------------------------------- features and logits not finite

@pytest.fixture(scope="module")
def nan_weights(tmp_path_factory) -> dict[str, Path]:
    """tiny-clip weights files with one NaN: in the image projection ("image": every image feature is NaN), or
    in the text projection ("text": every class's text feature is NaN, the image features stay finite). Made
    here, not in a test: a backbone built in a test logs to the command line's earlier, closed stream."""
    folder, paths = tmp_path_factory.mktemp("nan"), {}
    for tower, key in (("image", "visual.proj"), ("text", "text_projection")):
        state = tiny_backbone().model.state_dict()
        state[key][0, 0] = float("nan")
        paths[tower] = folder / f"tiny-nan-{tower}.pt"
        torch.save(state, paths[tower])
    return paths


@pytest.mark.parametrize("methods, features", [("[zeroshot]", "fashion_mnist_sample test"),
                                               ("[linear_probe]", "train"), ("[coop]", "train")])
def test_a_backbone_with_a_nan_weight_stops_before_any_result(tmp_path, tool_error, nan_weights, methods, features):
    """Was: accuracy 10.00 and ECE 0.00 (zeroshot), a scikit-learn traceback, advice to lower train.lr (coop)."""
    out = tmp_path / "run"
    line = tool_error(f"backbone.pretrained={nan_weights['image']}", f"methods={methods}", f"output_dir={out}",
                      f"cache_dir={tmp_path / 'cache'}", "train.epochs=1")
    assert re.fullmatch(rf"error: {features} features: the backbone tiny-clip \(weights "
                        rf"{re.escape(str(nan_weights['image']))}\) gave image features that are not finite \(NaN or inf\) "
                        r"for (\d+) of \1 images, e\.g\. \S+\.png; check the weights \(a damaged or diverged "
                        r"checkpoint holds NaN\) or try backbone\.precision=fp32 \(fp16 overflows\)", line), line
    assert not (out / "metrics.json").exists() and not list(out.rglob("*.csv"))
    assert not list((tmp_path / "cache").glob("*.pt"))  # nothing cached either


def test_a_nan_text_tower_is_named_at_the_method_whose_logits_it_spoils(tmp_path, tool_error, nan_weights):
    out = tmp_path / "run"
    line = tool_error(f"backbone.pretrained={nan_weights['text']}", "methods=[zeroshot]", f"output_dir={out}",
                      f"cache_dir={tmp_path / 'cache'}")
    assert re.fullmatch(r"error: zeroshot: its logits on the fashion_mnist_sample test images are not finite \(NaN or "
                        r"inf\) for (\d+) of \1 images, e\.g\. \S+\.png, though the image features are; check the "
                        r"backbone's text tower weights and the method's settings\. No result was written for it",
                        line), line
    assert not (out / "metrics.json").exists() and not list(out.rglob("*.csv"))


def test_a_cache_file_holding_nan_features_is_named(tmp_path, train_coop, capsys):
    args = [f"cache_dir={tmp_path / 'cache'}", "methods=[zeroshot]"]
    assert train_coop.call(capsys, f"output_dir={tmp_path / 'run'}", *args).returncode == 0
    cached = list((tmp_path / "cache").glob("*.pt"))
    assert len(cached) == 1  # the test features
    payload = torch.load(cached[0], weights_only=True)
    del payload["checksum"]
    payload["features"][3, 0] = float("nan")
    payload["checksum"] = content_digest(payload)  # intact, as a version that did not check its features wrote it
    torch.save(payload, cached[0])
    out = tmp_path / "again"
    line = train_coop.call(capsys, f"output_dir={out}", *args).error()
    assert re.fullmatch(rf"error: feature cache file {re.escape(str(cached[0]))} holds features that are not finite "
                        r"\(NaN or inf\) for 1 of \d+ images; delete it \(the features are extracted again\), or "
                        r"run with cache_dir=none", line), line
    assert not (out / "metrics.json").exists()


class FiniteFeatures:
    """A stand-in feature bank: four finite test features (with their norms, which the published linear probe
    scores them by)."""

    dataset = DatasetSplits("pets", ["cat", "dog"])

    def test_of(self, dataset=None):
        x = F.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)), dim=-1)  # tiny-clip's
        return SplitFeatures(x, torch.tensor([0, 1, 0, 1]), [f"/img/{i}.png" for i in range(4)], torch.ones(4))


def test_a_method_whose_logits_are_not_finite_is_named_and_writes_nothing(tmp_path):
    cfg = load_config([QUICKSTART])
    method = build_method("linear_probe", cfg, tiny_backbone(), ["cat", "dog"])
    method.weight.data[1, 5] = float("nan")
    target = Target("pets", DatasetSplits("pets", ["cat", "dog"]), cfg.data)
    with pytest.raises(NonFinite, match=r"linear_probe: its logits on the pets test images are not finite \(NaN or "
                                        r"inf\) for 4 of 4 images, e\.g\. /img/0\.png, though the image features "
                                        r"are; check the backbone's text tower weights and the method's settings\. "
                                        r"No result was written for it"):
        evaluate_on(method, target, FiniteFeatures(), tmp_path / "linear_probe", cfg)
    assert not (tmp_path / "linear_probe").exists()
