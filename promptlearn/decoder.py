"""Learned CoOp context vectors read as words: the nearest vocabulary tokens of every vector.

CoOp's own answer (its interpret_prompt.py) maps each context vector to its nearest token embeddings
by Euclidean distance, for one backbone and unified contexts only. Here: any backbone, unified and
class-specific contexts, Euclidean or cosine distance, from a live CoOp method, a promptlearn
checkpoint or a reference CoOp checkpoint, with a summary of how far the context has left the vocabulary.
"""
from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import torch
import torch.nn.functional as F

from promptlearn.backbone import FrozenCLIP, load_backbone
from promptlearn.checkpoint import FORMAT, DamagedCheckpoint, is_promptlearn_checkpoint, read_weights_only, verified
from promptlearn.config import CLASS_POSITIONS, BackboneConfig
from promptlearn.errors import CheckpointError, ConfigError
from promptlearn.io import atomic_write_json, atomic_write_text
from promptlearn.progress import progress
from promptlearn.prompts import layout_prompt
from promptlearn.tokens import PromptTokenizer

log = logging.getLogger("promptlearn")

METRICS = {"euclidean": "Euclidean distance (CoOp's reference method)",
           "cosine": "cosine distance, 1 - cosine similarity"}
TEXT_FILE, JSON_FILE = "decoded_prompt.txt", "decoded_prompt.json"
UNIFIED_CLASS = "CLASS"  # what a unified context's prompt shows where the class name goes
REFERENCE_DEFAULT_PRETRAINED = "openai"  # the reference CoOp trains on OpenAI CLIP weights
RERANK_MARGIN = 8  # candidates beyond k re-measured exactly after the fast matrix-product ranking
SCORE_BUDGET = 2 ** 24  # elements of one [vectors, vocabulary chunk] score matrix (64 MiB in fp32)
ROW_BLOCK = 1024  # context vectors per pass over the vocabulary
SPACING_SAMPLE = 512  # vocabulary tokens sampled to measure the vocabulary's own spacing
PRINTED_CLASSES = 20  # class rows in the short report printed at the end of a run
MATCH_TOLERANCE = 1e-2  # of the mean token norm: frozen prompt parts must be vocabulary tokens


# ----------------------------------------------------------------------------- nearest tokens

def nearest_tokens(vectors: torch.Tensor, table: torch.Tensor, k: int, metric: str = "euclidean",
                   excluded: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """The k rows of `table` [V, D] nearest to each row of `vectors` [N, D], nearest first:
    (ids [N, k], distances [N, k]) on the CPU. Rows in `excluded` are never candidates.

    Candidates are ranked by matrix products over chunks of the vocabulary (memory bounded by
    SCORE_BUDGET whatever V), then the best k + RERANK_MARGIN are measured directly, so a vector
    equal to a token embedding is at distance exactly 0 under either metric.
    """
    if metric not in METRICS:
        raise ConfigError(f"unknown distance metric {metric!r}; use one of {', '.join(METRICS)}")
    excluded = torch.tensor(sorted(set(excluded)), dtype=torch.long, device=table.device)
    available = len(table) - len(excluded)
    k = min(k, available)
    pool = min(k + RERANK_MARGIN, available)
    blocks = vectors.detach().split(ROW_BLOCK)
    all_ids, all_dist = [], []
    for block in progress(blocks, desc="nearest tokens", leave=False, disable=len(blocks) < 4):
        x = block.to(table.device, torch.float32)
        ids = _candidates(x, table, pool, metric, excluded)
        dist = _distances(x, table[ids].float(), metric)
        dist, order = dist.sort(dim=1, stable=True)
        all_ids.append(ids.gather(1, order)[:, :k].cpu())
        all_dist.append(dist[:, :k].cpu())
    return torch.cat(all_ids), torch.cat(all_dist)


def _candidates(x: torch.Tensor, table: torch.Tensor, pool: int, metric: str,
                excluded: torch.Tensor) -> torch.Tensor:
    """The `pool` best token ids per row by a score with the metric's ranking, chunk by chunk."""
    query = F.normalize(x, dim=-1) if metric == "cosine" else x
    step = max(pool, SCORE_BUDGET // len(x))
    best_score = x.new_empty(len(x), 0)
    best_ids = torch.empty(len(x), 0, dtype=torch.long, device=x.device)
    for start in range(0, len(table), step):
        rows = table[start:start + step].float()
        if metric == "cosine":
            score = -(query @ F.normalize(rows, dim=-1).T)
        else:  # |x - t|^2 - |x|^2, which ranks tokens as the Euclidean distance does
            score = rows.square().sum(-1) - 2 * (query @ rows.T)
        inside = excluded[(excluded >= start) & (excluded < start + len(rows))]
        score[:, inside - start] = float("inf")
        chunk_score, chunk_ids = score.topk(min(pool, score.shape[1]), dim=1, largest=False)
        best_score = torch.cat([best_score, chunk_score], 1)
        best_ids = torch.cat([best_ids, chunk_ids + start], 1)
        best_score, keep = best_score.topk(min(pool, best_score.shape[1]), dim=1, largest=False)
        best_ids = best_ids.gather(1, keep)
    return best_ids


def _distances(x: torch.Tensor, candidates: torch.Tensor, metric: str) -> torch.Tensor:
    """Distances [N, P] from x [N, D] to its candidates [N, P, D], measured directly."""
    if metric == "cosine":  # 1 - cos = |a/|a| - b/|b||^2 / 2, normalised in one call so equal vectors give 0
        unit = F.normalize(torch.cat([x[:, None], candidates], 1), dim=-1)
        return (unit[:, :1] - unit[:, 1:]).square().sum(-1) / 2
    return (x[:, None] - candidates).norm(dim=-1)


def vocabulary(backbone: FrozenCLIP) -> tuple[torch.Tensor, list[int]]:
    """The token-embedding rows the tokenizer can name, and the special ids excluded as candidates."""
    tok = backbone.tokenizer
    table = backbone.text.token_embedding.weight.detach()[:tok.vocab_size]
    return table, sorted(tok.special_ids)


def vocabulary_spacing(table: torch.Tensor, excluded: list[int], metric: str) -> float:
    """Mean distance from a vocabulary token to its nearest other token, over a fixed sample: the
    scale on which a context's distances read (well below it: still close to a word)."""
    keep = torch.ones(len(table), dtype=torch.bool)
    keep[excluded] = False
    ids = keep.nonzero().squeeze(1)
    sample = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))[:SPACING_SAMPLE]]
    _, dist = nearest_tokens(table[sample.to(table.device)], table, 2, metric, excluded)
    return float(dist[:, 1].mean())  # column 0 is the token itself


# ----------------------------------------------------------------------------- readable text

def text_of(tok: PromptTokenizer, ids: list[int]) -> str:
    """Readable text of a run of tokens. Decoding the run as a whole (rather than joining single
    tokens) resolves word boundaries (BPE end-of-word, SentencePiece word-start) and multi-byte
    characters split across tokens."""
    return tok.decode(ids).strip()


def prompt_text(tok: PromptTokenizer, ctx_ids: list[int], name: str, position: str) -> str:
    """The prompt as the model reads it, class name in brackets: "a photo [dog] of a."
    The layout is CoOp's own (layout_prompt), so the decoded prompt cannot drift from the trained one."""
    dot = tok.encode(".")
    ids, ctx_positions = layout_prompt(tok, ctx_ids, name, position)
    in_ctx = set(ctx_positions)
    body = range(len(tok.start_ids), len(ids) - len(dot) - len(tok.end_ids))  # between SOS and ". EOS"
    parts = []
    for is_ctx, run in groupby(body, key=in_ctx.__contains__):
        parts.append(text_of(tok, [ids[i] for i in run]) if is_ctx else f"[{name}]")
    return " ".join(parts) + text_of(tok, dot)


# ----------------------------------------------------------------------------- results

@dataclass
class DecodedContext:
    """One context (the unified one, or one class's) read as its nearest tokens."""
    classname: str | None  # None for a unified context
    ids: list[list[int]]  # [position][rank]: the k nearest token ids, nearest first
    texts: list[list[str]]  # their readable texts (a trailing space ends a word)
    distances: list[list[float]]
    context: str  # the nearest tokens as a phrase: "a photo of a"
    prompt: str  # the prompt as the model reads it: "a photo of a [dog]."

    @property
    def nearest_distances(self) -> list[float]:
        return [d[0] for d in self.distances]

    @property
    def mean_distance(self) -> float:
        return sum(self.nearest_distances) / len(self.distances)

    @property
    def max_distance(self) -> float:
        return max(self.nearest_distances)

    def to_json(self) -> dict:
        return {"class": self.classname, "context": self.context, "prompt": self.prompt,
                "mean_distance": self.mean_distance, "max_distance": self.max_distance,
                "positions": [[{"id": i, "text": t, "distance": d} for i, t, d in zip(*row)]
                              for row in zip(self.ids, self.texts, self.distances)]}


@dataclass
class DecodedPrompt:
    source: str
    model: str
    pretrained: str
    metric: str
    topk: int
    class_position: str
    class_specific: bool
    n_ctx: int
    vocabulary_size: int  # candidate tokens (special tokens excluded)
    vocabulary_spacing: float
    contexts: list[DecodedContext]
    warnings: list[str] = field(default_factory=list)

    @property
    def mean_distance(self) -> float:
        """Mean over every context vector of its distance to the nearest token."""
        return sum(c.mean_distance for c in self.contexts) / len(self.contexts)

    @property
    def max_distance(self) -> float:
        return max(c.max_distance for c in self.contexts)

    def summary(self) -> dict:
        """The short form kept in metrics.json."""
        prompts = ({"prompts": {c.classname: c.prompt for c in self.contexts}} if self.class_specific
                   else {"prompt": self.contexts[0].prompt, "context": self.contexts[0].context})
        return {**prompts, "metric": self.metric, "mean_distance": self.mean_distance,
                "max_distance": self.max_distance, "vocabulary_spacing": self.vocabulary_spacing}

    def to_json(self) -> dict:
        return {"source": self.source, "model": self.model, "pretrained": self.pretrained,
                "metric": self.metric, "topk": self.topk, "n_ctx": self.n_ctx,
                "class_specific": self.class_specific, "class_position": self.class_position,
                "vocabulary_size": self.vocabulary_size, "vocabulary_spacing": self.vocabulary_spacing,
                "mean_distance": self.mean_distance, "max_distance": self.max_distance,
                "warnings": self.warnings, "contexts": [c.to_json() for c in self.contexts]}

    def report(self, detail: bool = True) -> str:
        """Plain-text report; `detail` adds every class and the k nearest tokens of every vector."""
        kind = f"class-specific ({len(self.contexts)} classes)" if self.class_specific else "unified"
        ratio = self.mean_distance / self.vocabulary_spacing if self.vocabulary_spacing > 0 else float("nan")
        lines = [f"Decoded CoOp context: {self.source}",
                 f"  backbone: {self.model} (pretrained: {self.pretrained}); {self.vocabulary_size} "
                 "candidate tokens, start/end tokens excluded",
                 f"  context:  {self.n_ctx} vectors, {kind}, class name at the {self.class_position}",
                 f"  metric:   {METRICS[self.metric]}; 0 = the vector is exactly a vocabulary token",
                 f"  scale:    a vocabulary token's nearest other token is at {self.vocabulary_spacing:.4f} on average",
                 *[f"  WARNING:  {w}" for w in self.warnings], ""]
        if not self.class_specific:
            lines.append(f"nearest prompt: {self.contexts[0].prompt}")
        lines.append(f"mean distance to the nearest token: {self.mean_distance:.4f} "
                     f"(max {self.max_distance:.4f}; {ratio:.1%} of the vocabulary spacing)")
        if self.class_specific:
            lines += ["", *self._class_table(None if detail else PRINTED_CLASSES)]
        if detail:
            lines += ["", f"the {self.topk} nearest tokens of each context vector, with distances "
                          "(a trailing space inside the quotes ends a word):"]
            for c in self.contexts:
                if self.class_specific:
                    lines.append(f"{c.classname}: {c.prompt}")
                for position, (texts, dists) in enumerate(zip(c.texts, c.distances), 1):
                    cells = [f"{_ljust(_quoted(t), 14)} {d:.4f}" for t, d in zip(texts, dists)]
                    lines.append(f"  {position:>3}  " + "   ".join(cells))
        return "\n".join(lines)

    def _class_table(self, limit: int | None) -> list[str]:
        shown = self.contexts if limit is None else self.contexts[:limit]
        rows = [(c.classname, c.prompt, f"{c.mean_distance:.4f}", f"{c.max_distance:.4f}") for c in shown]
        rows.append(("all classes", "", f"{self.mean_distance:.4f}", f"{self.max_distance:.4f}"))
        head = ("class", "nearest prompt", "mean dist", "max dist")
        widths = [max(_display_width(r[i]) for r in [head, *rows]) for i in range(4)]

        def fmt(r: tuple) -> str:
            return f"{_ljust(r[0], widths[0])}  {_ljust(r[1], widths[1])}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}"

        lines = [fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows[:-1])]
        if len(shown) < len(self.contexts):
            lines.append(f"... {len(self.contexts) - len(shown)} more classes in {TEXT_FILE}")
        return lines + [fmt(rows[-1])]


def _display_width(text: str) -> int:
    """Terminal columns: wide (CJK) characters take two, so the columns of the report line up."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _ljust(text: str, width: int) -> str:
    return text + " " * max(0, width - _display_width(text))


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# ----------------------------------------------------------------------------- decoding

def decode_context(ctx: torch.Tensor, backbone: FrozenCLIP, classnames: list[str] | None = None,
                   class_position: str = "end", topk: int = 3, metric: str = "euclidean",
                   source: str = "context", warnings: list[str] = (), fixed_ids: list[int] = ()) -> DecodedPrompt:
    """Decode a context [M, D] (unified) or [C, M, D] (class-specific, one per class name); `fixed_ids` are
    the prompt's words between the context and the class name (ProGrad's published prompts)."""
    if ctx.dim() not in (2, 3):
        raise CheckpointError(f"{source}: a context is [M, D] or [classes, M, D], got shape {tuple(ctx.shape)}")
    if class_position not in CLASS_POSITIONS:
        raise ConfigError(f"class position must be one of {', '.join(CLASS_POSITIONS)}, got {class_position!r}")
    if topk < 1:
        raise ConfigError(f"topk must be at least 1, got {topk}")
    _check_width(ctx, backbone, source)
    width = backbone.text.width
    class_specific = ctx.dim() == 3
    if class_specific:
        classnames = list(classnames) if classnames else [f"class {i + 1}" for i in range(len(ctx))]
        if len(classnames) != len(ctx):
            raise CheckpointError(f"{source}: {len(ctx)} class-specific contexts but {len(classnames)} class names")
    tok = backbone.tokenizer
    table, excluded = vocabulary(backbone)
    contexts = ctx if class_specific else ctx[None]
    ids, dist = nearest_tokens(contexts.reshape(-1, width), table, topk, metric, excluded)
    n_ctx = contexts.shape[1]
    ids, dist = ids.view(len(contexts), n_ctx, -1).tolist(), dist.view(len(contexts), n_ctx, -1).tolist()
    decoded = []
    for i, (row_ids, row_dist) in enumerate(zip(ids, dist)):
        nearest = [position[0] for position in row_ids]
        name = classnames[i] if class_specific else None
        decoded.append(DecodedContext(
            classname=name, ids=row_ids, distances=row_dist,
            texts=[[tok.token_text(t) for t in position] for position in row_ids],
            context=text_of(tok, nearest),
            prompt=prompt_text(tok, nearest + list(fixed_ids), name or UNIFIED_CLASS, class_position)))
    return DecodedPrompt(source=source, model=backbone.name, pretrained=backbone.pretrained, metric=metric,
                         topk=len(ids[0][0]), class_position=class_position, class_specific=class_specific,
                         n_ctx=n_ctx, vocabulary_size=len(table) - len(excluded),
                         vocabulary_spacing=vocabulary_spacing(table, excluded, metric),
                         contexts=decoded, warnings=list(warnings))


def _check_width(ctx: torch.Tensor, backbone: FrozenCLIP, source: str) -> None:
    if ctx.shape[-1] != backbone.text.width:
        raise CheckpointError(
            f"{source}: the context vectors have width {ctx.shape[-1]} but the token embeddings of "
            f"{backbone.name} (pretrained {backbone.pretrained}) have width {backbone.text.width}; name the "
            "backbone the context was trained with")


def decode_method(method, topk: int = 3, metric: str = "euclidean", source: str | None = None) -> DecodedPrompt:
    """Decode the current context of a prompt method (anything with `prompts.ctx`, `prompts.position`,
    `prompts.fixed_ids`, `backbone` and `classnames`, such as CoOp)."""
    prompts = method.prompts
    return decode_context(prompts.ctx, method.backbone, method.classnames, prompts.position, topk, metric,
                          source or f"{method.name} context", fixed_ids=prompts.fixed_ids)


def save_decoded_prompt(method, folder: str | Path, topk: int = 3) -> DecodedPrompt:
    """Decode a trained CoOp context (Euclidean, as CoOp does) and write decoded_prompt.txt/.json into `folder`."""
    decoded = decode_method(method, topk, source=f"{method.name} in {folder}")
    write_decoded_prompt(decoded, folder)
    return decoded


def write_decoded_prompt(decoded: DecodedPrompt, folder: str | Path) -> None:
    folder = Path(folder)
    atomic_write_text(folder / TEXT_FILE, decoded.report() + "\n")
    atomic_write_json(folder / JSON_FILE, decoded.to_json())


def rebuild_backbone(model: str, pretrained: str, device: str = "auto") -> FrozenCLIP:
    """The backbone a run used (load_backbone seeds random backbones the same way in every process)."""
    return load_backbone(BackboneConfig(model=model, pretrained=pretrained, device=device))


def decode_checkpoint(path: str | Path, backbone: FrozenCLIP | None = None, topk: int = 3,
                      metric: str = "euclidean", model: str | None = None, pretrained: str | None = None,
                      class_position: str | None = None, device: str = "auto") -> DecodedPrompt:
    """Decode a promptlearn CoOp checkpoint or a reference CoOp one (a state dict with `ctx`).

    The backbone is `backbone` if given, else the one `model`/`pretrained` name, else (promptlearn
    checkpoints only) the one recorded in the checkpoint. `class_position` is for reference
    checkpoints, which do not record it (CoOp's default: end).
    """
    payload = _load(path)
    if payload.get("format") == FORMAT:
        meta, state = payload["meta"], payload["state"]
        if "prompts.ctx" not in state:
            raise CheckpointError(f"checkpoint {path} holds a {payload.get('method', 'non-CoOp')} model, which has "
                                  "no prompt context; decode the checkpoint of a coop or coop_csc run")
        if class_position and class_position != meta["class_position"]:
            log.warning("the checkpoint records class position %r; ignoring %r", meta["class_position"], class_position)
        backbone = backbone or rebuild_backbone(model or meta["model"], pretrained or meta["pretrained"], device)
        trained, used = (meta["model"], meta["pretrained"]), (backbone.name, backbone.pretrained)
        warnings = [] if trained == used else [f"the context was trained on {trained[0]} ({trained[1]}) and is "
                                               f"decoded with {used[0]} ({used[1]})"]
        return decode_context(state["prompts.ctx"], backbone, meta.get("classnames"), meta["class_position"],
                              topk, metric, str(path), warnings, fixed_ids=meta.get("fixed_ids", []))
    state = payload.get("state_dict", payload)
    if not isinstance(state, dict) or not isinstance(state.get("ctx"), torch.Tensor):
        raise CheckpointError(f"checkpoint {path} holds no prompt context: it is neither a promptlearn checkpoint "
                              "nor a CoOp state dict with 'ctx' (its top-level keys: "
                              f"{', '.join(map(str, payload)) or 'none'})")
    if backbone is None:
        if not model:
            raise ConfigError(f"checkpoint {path} is a reference CoOp context, which does not record its "
                              "backbone; name it with --model NAME --pretrained TAG|PATH|none (e.g. --model RN50 "
                              "--pretrained openai)")
        backbone = rebuild_backbone(model, pretrained or REFERENCE_DEFAULT_PRETRAINED, device)
    ctx, source = state["ctx"].float(), f"{path} (reference CoOp)"
    _check_width(ctx, backbone, source)
    classnames, warnings = _check_reference_prompt(state, backbone, class_specific=ctx.dim() == 3)
    return decode_context(ctx, backbone, classnames, class_position or "end", topk, metric, source, warnings)


def _load(path: str | Path) -> dict:
    """A promptlearn checkpoint (checksum verified), else any file that a weights-only load reads, such as a
    reference CoOp state dict; a refusal names the way out for reference CoOp (Dassl) checkpoints, which
    pickle their learning-rate scheduler."""
    try:
        payload = read_weights_only(path)
    except DamagedCheckpoint:
        raise
    except CheckpointError as refused:  # missing, not a torch file, or pickled code
        raise CheckpointError(f"{refused}{_dassl_hint(path)}") from None
    if is_promptlearn_checkpoint(payload):
        return verified(path, payload)
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(payload).__name__}, not a dict with a prompt context")
    return payload


def _dassl_hint(path: str | Path) -> str:
    find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    try:
        unsafe = find(path) if find and Path(path).is_file() else []
    except Exception:  # not a readable torch file: the first message says so
        unsafe = []
    if not any(name.startswith("torch.optim.lr_scheduler") for name in unsafe):
        return ""
    return (" It looks like a reference CoOp checkpoint, which also pickles its learning-rate scheduler. If "
            "you trust the file, save its prompt alone and decode that file: python -c \"import torch; "
            f"c = torch.load('{path}', weights_only=False); torch.save({{'state_dict': c['state_dict']}}, "
            "'prompt.pt')\"")


def _check_reference_prompt(state: dict, backbone: FrozenCLIP,
                            class_specific: bool) -> tuple[list[str] | None, list[str]]:
    """The frozen prompt parts a reference checkpoint keeps (token_prefix = [SOS], token_suffix =
    class name, '.', EOS) must be this backbone's token embeddings; if so, the class names of a
    class-specific context are read back from the suffix."""
    tok = backbone.tokenizer
    table, _ = vocabulary(backbone)
    tolerance = MATCH_TOLERANCE * float(table.float().norm(dim=-1).mean())
    mismatch = (f"the checkpoint's frozen prompt embeddings are not the token embeddings of {backbone.name} "
                f"(pretrained {backbone.pretrained}): the context was probably trained on another backbone, "
                "and its decoding is meaningless")
    prefix, suffix = state.get("token_prefix"), state.get("token_suffix")
    if prefix is not None and tok.start_ids:
        sos = table[tok.start_ids[0]].float().cpu()
        if float((prefix.reshape(-1, prefix.shape[-1])[0].float() - sos).norm()) > tolerance:
            return None, [mismatch]
    if not class_specific or suffix is None:
        return None, []
    names: list[list[int]] = [[] for _ in range(len(suffix))]
    open_rows = list(range(len(suffix)))
    for column in range(suffix.shape[1]):  # read token by token until each row's EOS
        if not open_rows:
            break
        ids, dist = nearest_tokens(suffix[open_rows, column].float(), table, 1)
        if float(dist.max()) > tolerance:
            return None, [mismatch]
        for row, token in zip(list(open_rows), ids[:, 0].tolist()):
            if token in tok.end_ids:
                open_rows.remove(row)
            else:
                names[row].append(token)
    # the prompt's final "." may be merged into the name's last token (")."): strip it from the text
    return [text_of(tok, ids).removesuffix(".").strip() for ids in names], []
