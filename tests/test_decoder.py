"""The prompt decoder: exact decoding of phrase-initialised contexts, trained contexts, reference
CoOp checkpoints, and the messages of bad inputs to tools/inspect_prompt.py."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
from helpers import NoStartTokenizer, quick_config, tiny_backbone

from promptlearn import decoder
from promptlearn.backbone import FrozenCLIP
from promptlearn.checkpoint import save_checkpoint
from promptlearn.commands import entry
from promptlearn.config import BackboneConfig, load_config
from promptlearn.decoder import (
    JSON_FILE,
    TEXT_FILE,
    decode_checkpoint,
    decode_method,
    nearest_tokens,
    text_of,
)
from promptlearn.methods import build_method
from promptlearn.runner import run_experiment

PHRASE = "a photo of a"
CLASSES = ["dog", "T-shirt/top", "ankle boot"]
PROMPTS = {"end": "a photo of a [{}].", "middle": "a photo [{}] of a.", "front": "[{}] a photo of a."}


@pytest.fixture(scope="module")
def backbones():
    return {name: tiny_backbone(name) for name in ("tiny-clip", "tiny-bidir-clip")}


def coop(backbone, *overrides: str, classnames=CLASSES):
    cfg = load_config([], [f"coop.ctx_init={PHRASE}", *overrides])
    return build_method("coop", cfg, backbone, classnames)


def inspect_prompt(monkeypatch, *args: str) -> int:
    """`promptlearn inspect` as the shell runs it (PromptlearnError -> exit 2)."""
    with pytest.raises(SystemExit) as exit_:
        entry(["inspect", *args])
    return exit_.value.code


@pytest.mark.parametrize("model", ["tiny-clip", "tiny-bidir-clip"])
@pytest.mark.parametrize("class_specific", [False, True])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_phrase_initialised_context_decodes_exactly(backbones, model, class_specific, position):
    method = coop(backbones[model], f"coop.class_specific={str(class_specific).lower()}",
                  f"coop.class_position={position}")
    phrase_ids = backbones[model].tokenizer.encode(PHRASE)
    for metric in ("euclidean", "cosine"):
        decoded = decode_method(method, topk=3, metric=metric)
        assert decoded.class_specific is class_specific and decoded.metric == metric
        names = CLASSES if class_specific else ["CLASS"]
        assert [c.classname for c in decoded.contexts] == (CLASSES if class_specific else [None])
        for context, name in zip(decoded.contexts, names):
            assert context.context == PHRASE
            assert context.prompt == PROMPTS[position].format(name)
            assert [position_ids[0] for position_ids in context.ids] == phrase_ids
            assert context.nearest_distances == [0.0] * len(phrase_ids)
            assert all(row[1] > 0 for row in context.distances)  # the runner-up is another token
        assert decoded.mean_distance == 0.0 and decoded.vocabulary_spacing > 0


def test_nearest_tokens_matches_brute_force_in_small_chunks(monkeypatch):
    monkeypatch.setattr(decoder, "SCORE_BUDGET", 40)  # many vocabulary chunks
    monkeypatch.setattr(decoder, "ROW_BLOCK", 3)  # several blocks of vectors
    g = torch.Generator().manual_seed(0)
    table = torch.randn(300, 16, generator=g)
    vectors = torch.cat([table[[5, 7]], torch.randn(6, 16, generator=g)])
    excluded = [7, 11, 299]
    allowed = torch.ones(300, dtype=torch.bool)
    allowed[excluded] = False
    for metric in ("euclidean", "cosine"):
        ids, dist = nearest_tokens(vectors, table, 4, metric, excluded)
        if metric == "euclidean":
            full = torch.cdist(vectors, table, compute_mode="donot_use_mm_for_euclid_dist")
        else:
            full = 1 - torch.nn.functional.normalize(vectors, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
        expected_dist, expected_ids = full[:, allowed].sort(dim=1)
        assert torch.equal(ids, allowed.nonzero().squeeze(1)[expected_ids[:, :4]])
        torch.testing.assert_close(dist, expected_dist[:, :4], atol=1e-5, rtol=1e-5)
        assert dist[0, 0] == 0 and ids[0, 0] == 5  # a token's own embedding, exactly
        assert 7 not in ids[1].tolist()  # excluded even when it is the vector itself


def test_context_off_the_vocabulary_reports_its_distance(backbones):
    method = coop(backbones["tiny-clip"])
    with torch.no_grad():
        method.prompts.ctx[1] += 0.3 * method.prompts.ctx[1].norm() * torch.nn.functional.normalize(
            torch.randn(method.prompts.ctx.shape[1], generator=torch.Generator().manual_seed(1)), dim=0)
    decoded = decode_method(method, topk=2)
    distances = decoded.contexts[0].nearest_distances
    assert distances[0] == distances[2] == distances[3] == 0.0 and distances[1] > 0
    assert decoded.mean_distance == pytest.approx(distances[1] / 4)
    report = decoded.report()
    assert "nearest prompt: a " in report and f"{decoded.mean_distance:.4f}" in report


def test_prompt_without_start_token(backbones):
    """SigLIP-style layout (no start token): the prompt text still reads as the model sees it."""
    class Readable(NoStartTokenizer):  # with what an HF-style tokenizer offers the decoder
        vocab_size = 49408

        def decode(self, ids):
            return self.inner.decode(ids)

    tiny = backbones["tiny-bidir-clip"]
    backbone = FrozenCLIP(tiny.model, Readable(32), tiny.preprocess,
                          BackboneConfig(model="tiny-bidir-clip", pretrained="none", device="cpu"), tiny.device)
    decoded = decode_method(coop(backbone, "coop.class_position=middle"))
    assert decoded.contexts[0].prompt == "a photo [CLASS] of a." and decoded.mean_distance == 0.0


def test_run_decodes_trained_class_specific_context(backbones, tmp_path, capsys):
    cfg = quick_config(tmp_path, "methods=[coop]", "train.epochs=3", "eval.decode_topk=2")
    metrics = run_experiment(cfg)
    summary = metrics["coop"]["decoded_prompt"]
    folder = tmp_path / "run" / "coop"
    classnames = torch.load(folder / "checkpoint.pt", weights_only=True)["meta"]["classnames"]
    assert list(summary["prompts"]) == classnames and len(classnames) == 10
    assert summary["metric"] == "euclidean" and summary["mean_distance"] > 0  # training moved the context
    saved = json.loads((folder / JSON_FILE).read_text())
    assert saved["class_specific"] and [c["class"] for c in saved["contexts"]] == list(summary["prompts"])
    assert all(len(position) == 2 for c in saved["contexts"] for position in c["positions"])
    assert all(c["mean_distance"] > 0 for c in saved["contexts"])
    text = (folder / TEXT_FILE).read_text()
    assert "mean distance to the nearest token" in text and "all classes" in text
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["coop"]["decoded_prompt"] == summary
    printed = capsys.readouterr().out
    assert printed.index("| coop |") < printed.index("Decoded CoOp context") and "all classes" in printed

    # the checkpoint alone rebuilds the same (random) backbone and gives the same reading
    again = decode_checkpoint(folder / "checkpoint.pt", topk=2, device="cpu")
    assert again.mean_distance == pytest.approx(saved["mean_distance"], abs=1e-6)
    assert [c.prompt for c in again.contexts] == list(summary["prompts"].values()) and not again.warnings
    other = decode_checkpoint(folder / "checkpoint.pt", backbones["tiny-bidir-clip"], topk=1)
    assert "trained on tiny-clip (none) and is decoded with tiny-bidir-clip" in other.warnings[0]


def reference_state(method) -> dict:
    """What the reference CoOp keeps in prompt_learner/model.pth.tar-N (fp16 CLIP): ctx, [SOS], the rest."""
    prompts = method.prompts
    embeds = prompts.token_embeds.half()
    return {"ctx": prompts.ctx.detach().clone(), "token_prefix": embeds[:, :1].clone(),
            "token_suffix": embeds[:, 1 + prompts.n_ctx:].clone()}


def test_reference_coop_checkpoint(backbones, tmp_path, monkeypatch, capsys):
    path, out = tmp_path / "model.pth.tar-50", tmp_path / "decoded.json"
    torch.save({"state_dict": reference_state(coop(backbones["tiny-clip"], "coop.truncate_prompts=false")),
                "epoch": 50}, path)
    assert inspect_prompt(monkeypatch, str(path), "--model", "tiny-clip", "--pretrained", "none",
                          "--metric", "cosine", "--json", str(out), "--device", "cpu") == 0
    assert "nearest prompt: a photo of a [CLASS]." in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["metric"] == "cosine" and saved["contexts"][0]["context"] == PHRASE
    assert saved["mean_distance"] == 0.0 and not saved["warnings"]


def test_reference_class_specific_checkpoint_reads_class_names(backbones, tmp_path):
    backbone = backbones["tiny-clip"]
    path = tmp_path / "csc.pth.tar"
    state = reference_state(coop(backbone, "coop.class_specific=true", "coop.truncate_prompts=false"))
    torch.save({"state_dict": state}, path)
    decoded = decode_checkpoint(path, backbone, class_position="middle")
    tok = backbone.tokenizer
    names = [text_of(tok, tok.encode(n)) for n in CLASSES]  # as the tokenizer reads them (lower case)
    assert [c.classname for c in decoded.contexts] == names and names[0] == "dog"
    assert [c.prompt for c in decoded.contexts] == [PROMPTS["middle"].format(n) for n in names]
    assert decoded.mean_distance == 0.0 and not decoded.warnings

    state["token_prefix"] = torch.randn_like(state["token_prefix"])  # trained on another backbone
    torch.save({"state_dict": state}, path)
    decoded = decode_checkpoint(path, backbone)
    assert "another backbone" in decoded.warnings[0] and decoded.contexts[0].classname == "class 1"
    assert "WARNING" in decoded.report()


class Pickled:  # any class: a weights-only load must refuse it
    pass


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("pickled", "refused"),
    ("reference CoOp with its scheduler", "save its prompt alone"),
    ("reference without backbone", "--model NAME --pretrained"),
    ("no context", "no prompt context"),
])
def test_tool_refuses_bad_checkpoints(tmp_path, monkeypatch, capsys, case, message):
    path = tmp_path / "checkpoint.pt"
    if case == "pickled":
        torch.save({"state_dict": {"ctx": torch.zeros(4, 64)}, "extra": Pickled()}, path)
    elif case == "reference CoOp with its scheduler":  # as Dassl saves prompt_learner/model.pth.tar-N
        ctx = torch.nn.Parameter(torch.zeros(4, 64))
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([ctx], lr=0.002), 50)
        torch.save({"state_dict": {"ctx": ctx.data}, "scheduler": {"successor": cosine}}, path)
    elif case == "reference without backbone":
        torch.save({"state_dict": {"ctx": torch.zeros(4, 64)}}, path)
    elif case == "no context":
        save_checkpoint(path, {"method": "linear_probe", "meta": {}, "state": {"weight": torch.zeros(2, 2)}})
    assert inspect_prompt(monkeypatch, str(path)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_width_mismatch_names_the_backbone(backbones, tmp_path):
    path = tmp_path / "wide.pt"
    torch.save({"state_dict": {"ctx": torch.zeros(4, 512), "token_prefix": torch.zeros(1, 1, 512)}}, path)
    with pytest.raises(decoder.CheckpointError, match="width 512.*tiny-clip.*width 64"):
        decode_checkpoint(path, backbones["tiny-clip"])


def test_open_clip_bpe_texts_are_readable(backbones):
    tok = backbones["tiny-clip"].tokenizer
    photo, = tok.encode("photo")
    assert tok.token_text(photo) == "photo "  # end-of-word marker -> a space
    assert text_of(tok, tok.encode("a photo of a")) == PHRASE
    assert isinstance(tok.tokenizer, open_clip.SimpleTokenizer)


def test_a_unified_checkpoint_with_fixed_words_decodes_from_the_file(tmp_path):
    """A unified context's checkpoint (no class list) decodes from the file alone, with the words that
    ctx_init_words leaves fixed before the class ("itap of a": "a" stays a word)."""
    run_experiment(quick_config(tmp_path, "methods=[coop]", "coop.class_specific=false", "coop.ctx_init=itap of a",
                                "coop.ctx_init_words=true", "train.epochs=1"))
    path = tmp_path / "run" / "coop" / "checkpoint.pt"
    assert torch.load(path, weights_only=True)["meta"]["fixed_ids"] == tiny_backbone().tokenizer.encode("a")
    decoded = decode_checkpoint(path, device="cpu")
    assert len(decoded.contexts) == 1 and decoded.contexts[0].prompt.endswith(" a [CLASS].")
    saved = json.loads((tmp_path / "run" / "coop" / JSON_FILE).read_text())
    assert decoded.contexts[0].prompt == saved["contexts"][0]["prompt"]  # the run's own reading
