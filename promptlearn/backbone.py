"""A frozen CLIP backbone from any open_clip model: features, tokenizer, preprocessing, logit scale."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import math
import os
import socket
import urllib.parse
import urllib.request
import warnings
import zipfile
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from promptlearn.config import BackboneConfig
from promptlearn.errors import ConfigError, PromptlearnError, nearest
from promptlearn.text_tower import TextTower
from promptlearn.tokens import PromptTokenizer

log = logging.getLogger("promptlearn")

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)  # the tiny test models: tiny-clip, tiny-rn-clip, ...
HF_NAME_KEYS = ("hf_model_name", "hf_tokenizer_name")


def _locate_shipped_hf_files() -> None:
    """The tiny configs name Hugging Face folders shipped beside them (a tiny RoBERTa config, tiny
    tokenizers); open_clip reads such names as hub ids or paths, so they become absolute paths."""
    for cfg_file in MODEL_CONFIG_DIR.glob("*.json"):
        text_cfg = open_clip.factory._MODEL_CONFIGS.get(cfg_file.stem, {}).get("text_cfg", {})
        for key in HF_NAME_KEYS:
            if text_cfg.get(key) and (MODEL_CONFIG_DIR / text_cfg[key]).is_dir():
                text_cfg[key] = str(MODEL_CONFIG_DIR / text_cfg[key])


_locate_shipped_hf_files()

RANDOM_INIT_SEED = 0  # random (pretrained=none) backbones are the same in every process
EVA_LOGIT_SCALE = 100.0  # EVA-CLIP convention for checkpoints with a missing or infinite scale
PURE_FP16_WARNING = (
    "backbone.precision=fp16_reference: pure fp16 as the original CoOp (fp16 weights and context, SGD "
    "updates rounded to fp16, no loss scaling). Small updates round away (in the 1e-5 warm-up epoch most "
    "context entries do not change at all): use it only to reproduce published runs; fp32, or fp16/bf16 "
    "autocast with fp32 master weights, is the recommended path")
RANDOM_WEIGHTS_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!! backbone {model!r} has RANDOM weights (pretrained=none): every accuracy it gives is\n"
    "!! meaningless. Use an open_clip tag (e.g. --pretrained openai) or a checkpoint path for real numbers.\n"
    + "!" * 78
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PromptlearnError(f"backbone.device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PromptlearnError(f"backbone.device is {name!r} but no CUDA GPU is available; use auto or cpu")
    return device


def image_memory_format(visual: torch.nn.Module, device: torch.device) -> torch.memory_format:
    """channels_last (NHWC) for a convolutional image tower (ResNet, ConvNeXt, other timm CNNs) on a GPU,
    where cuDNN's NHWC kernels are the fast ones under autocast; the layout as it is elsewhere: on the
    CPU, features stay bit-identical to those cached before, and a ViT's only convolution is its patch
    embedding, which gains nothing."""
    convolutions = sum(isinstance(m, torch.nn.Conv2d) for m in visual.modules())
    return torch.channels_last if device.type == "cuda" and convolutions > 1 else torch.preserve_format


class FrozenCLIP:
    """An open_clip model in eval mode with no gradients, and what the methods need from it."""

    def __init__(self, model, tokenizer, preprocess, cfg: BackboneConfig, device: torch.device):
        self.model = model.eval().requires_grad_(False)
        self.cfg = cfg
        self.name, self.pretrained = cfg.model, cfg.pretrained
        self.device = device
        self.image_memory_format = image_memory_format(model.visual, device)
        if self.image_memory_format == torch.channels_last:
            model.visual.to(memory_format=torch.channels_last)  # once, here: encode_images sends batches to match
        self.preprocess = preprocess  # the backbone's own evaluation transform
        length = getattr(tokenizer, "context_length", None) or model.context_length
        try:
            self._text: TextTower | None = TextTower(model, length)
            length = self._text.context_length
        except PromptlearnError as refusal:  # only the methods that run it on embeddings need it
            self._text, self._text_refusal = None, refusal
        self.tokenizer = PromptTokenizer(tokenizer, length)
        pp = model.visual.preprocess_cfg
        size = pp["size"]
        self.image_size: int = size if isinstance(size, int) else size[0]
        self.image_mean: tuple = tuple(pp["mean"])
        self.image_std: tuple = tuple(pp["std"])
        self.logit_scale = self._logit_scale(model, cfg)
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = float(bias.item()) if bias is not None else 0.0  # SigLIP; ranking unchanged
        self.precision = resolved_precision(cfg.precision, device)
        if cfg.precision not in ("auto", "fp32", "fp16_reference") and device.type != "cuda":
            log.warning("backbone.precision=%s needs a GPU; running fp32 on the CPU", cfg.precision)
        if self.precision == "fp16_reference":
            log.warning(PURE_FP16_WARNING)
            self.model.half()

    @property
    def parameter_dtype(self) -> torch.dtype:
        """The dtype of learned parameters that live in the backbone's space (CoOp's context)."""
        return torch.float16 if self.precision == "fp16_reference" else torch.float32

    @staticmethod
    def _logit_scale(model, cfg: BackboneConfig) -> float:
        if cfg.logit_scale is not None:
            return float(cfg.logit_scale)
        param = getattr(model, "logit_scale", None)
        scale = float(param.exp().item()) if param is not None else float("nan")
        if not math.isfinite(scale):
            log.warning("logit scale of %s is %s; using %g (EVA-CLIP convention). Set "
                        "backbone.logit_scale to override.", cfg.model, scale, EVA_LOGIT_SCALE)
            return EVA_LOGIT_SCALE
        return scale

    @property
    def text(self) -> TextTower:
        """The text tower run on token embeddings (CoOp, the decoder); refused, naming the family,
        where it cannot be."""
        if self._text is None:
            raise PromptlearnError(f"{self.name}: {self._text_refusal}")
        return self._text

    @functools.cached_property
    def embed_dim(self) -> int:
        """The width of the joint embedding, read off one encoded text: every family's towers differ
        in where they keep it (visual.output_dim, a timm head, a text projection)."""
        return int(self.encode_texts(["a"]).shape[1])

    def autocast(self, cache: bool = True):
        """bf16 / fp16 autocast on GPU; a no-op in fp32, in pure fp16 and on the CPU. cache=False for a
        region captured as a CUDA graph (autocast's cache of cast weights must not outlive the capture)."""
        if self.precision in ("fp32", "fp16_reference"):
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype, cache_enabled=cache)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """fp32 image features, L2-normalised unless normalize=False."""
        with self.autocast():
            images = images.to(self.device, next(self.model.visual.parameters()).dtype, non_blocking=True,
                               memory_format=self.image_memory_format)
            features = self.model.encode_image(images)
        return self.normalize(features) if normalize else features.float()

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        """L2-normalised fp32 features; under fp16_reference the division runs in fp16, as the original's."""
        pure_fp16 = self.precision == "fp16_reference"
        return F.normalize(features.half() if pure_fp16 else features.float(), dim=-1).float()

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
        """fp32 text features of sentences, through open_clip's own encode_text; L2-normalised unless
        `normalize` is false (CLAP keeps the raw features' norms)."""
        out = []
        for i in range(0, len(texts), batch_size):
            ids = self.tokenizer(texts[i:i + batch_size]).to(self.device)
            with self.autocast():
                out.append(self.model.encode_text(ids))
        out = torch.cat(out)
        return self.normalize(out) if normalize else out.float()

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities of normalised features (in fp16 under fp16_reference, as the original)."""
        if self.precision == "fp16_reference":
            image_features, text_features = image_features.half(), text_features.half()
        return self.logit_scale * image_features @ text_features.t() + self.logit_bias


def resolved_precision(setting: str, device: torch.device) -> str:
    """The precision a run uses: fp32 on the CPU (pure fp16 reproduces the original anywhere); "auto" is
    bf16 on a GPU that has it (the same range as fp32, no loss scaling) and fp16 on older ones."""
    if setting == "fp16_reference":
        return setting
    if device.type != "cuda":
        return "fp32"
    if setting == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return setting


def is_random_init(tag: str) -> bool:
    return tag.strip().lower() in ("", "none", "null", "random")


def pretrained_problem(model: str, tag: str) -> str | None:
    """Why `tag` names no weights for `model` (not a local file, not an open_clip tag), or None."""
    tag = tag.strip()
    if is_random_init(tag) or Path(tag).expanduser().is_file():
        return None
    tags = open_clip.list_pretrained_tags_by_model(model)
    if tag in tags:
        return None
    looks_like_path = "/" in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors"))
    what = f"the checkpoint file {tag} does not exist" if looks_like_path else \
        f"{tag!r} is not an open_clip pretrained tag for {model}"
    known = f" Known tags: {', '.join(tags)}." if tags else f" open_clip has no pretrained tags for {model}."
    return f"{what}.{known} Pass a tag, a local checkpoint path, or none (random weights)."


def model_problem(name: str) -> str | None:
    """Why `name` is no open_clip model (the nearest names and where the full list is), or None."""
    if name.startswith(("hf-hub:", "local-dir:")) or name in open_clip.list_models():
        return None
    close = nearest(name, open_clip.list_models())
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown open_clip model {name!r}{hint} See every name with: promptlearn list models"


HUB_PROBE_TIMEOUT_S = 5.0  # one connection attempt: a reachable hub answers well within it


@functools.lru_cache(maxsize=None)
def unreachable(url: str) -> str | None:
    """Why `url`'s host (or the proxy the environment sets for it) takes no connection, or None: one attempt,
    no retries, once a process."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        return str(e) or type(e).__name__
    return None


def download_problem(cfg: BackboneConfig) -> str | None:
    """Why the weights of an open_clip tag can be neither read from the local cache nor downloaded (the hub
    is unreachable, or HF_HUB_OFFLINE is set), or None. Found before open_clip tries, so that no download
    is retried (about 45 s and dozens of warnings)."""
    tag = cfg.pretrained.strip()
    if tag not in open_clip.list_pretrained_tags_by_model(cfg.model) or weights_cached(cfg.model, tag, cfg.cache_dir):
        return None  # random weights, a file, or weights already at hand
    from huggingface_hub import constants  # an open_clip dependency

    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    else:
        reason = unreachable(constants.ENDPOINT)
        if reason is None:
            return None
        why = f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached ({reason})"
    where = cfg.cache_dir or constants.HF_HUB_CACHE
    return (f"backbone {cfg.model} pretrained={tag}: its weights are not in the cache ({where}) and {why}. Pass "
            "a checkpoint file with --pretrained PATH, point backbone.cache_dir or HF_HOME at a cache that holds "
            "them (HF_HUB_OFFLINE=1 then skips the network), or use --pretrained none (random weights)")


def backbone_problems(cfg: BackboneConfig) -> list[str]:
    """What can be checked of the backbone setting before anything loads: model name, weights tag (and that
    they can be had), device."""
    problem = model_problem(cfg.model)
    if problem:
        return [problem]
    problems = [p for p in [pretrained_problem(cfg.model, cfg.pretrained) or download_problem(cfg),
                            transformers_problem(cfg.model)] if p]
    try:
        resolve_device(cfg.device)
    except PromptlearnError as e:
        problems.append(str(e))
    return problems


def _resolve_pretrained(cfg: BackboneConfig) -> str | None:
    tag = cfg.pretrained.strip()
    if is_random_init(tag):
        log.warning(RANDOM_WEIGHTS_WARNING.format(model=cfg.model))
        return None
    problem = pretrained_problem(cfg.model, tag) or download_problem(cfg)
    if problem:
        raise PromptlearnError(problem)
    return str(Path(tag).expanduser()) if Path(tag).expanduser().is_file() else tag


def is_openai_checkpoint(path: str) -> bool:
    """OpenAI's released CLIP files are TorchScript archives (a zip holding `constants.pkl` and `code/`);
    open_clip's own checkpoints are plain state dicts."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def load_openai_archive(model: torch.nn.Module, path: str) -> None:
    """Load the weights of an OpenAI TorchScript archive; its extra entries (input_resolution,
    context_length, vocab_size, attention masks) are not weights, a missing weight is an error."""
    state = torch.jit.load(path, map_location="cpu").state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})


def quick_gelu_for(cfg: BackboneConfig, pretrained: str | None) -> bool:
    """Whether to build the model with QuickGELU (x * sigmoid(1.702 x)), the activation of OpenAI's CLIP:
    the activation the weights were trained with, from the tag's pretrained config, from a `-quickgelu`
    model name, or from OpenAI's file format; `backbone.quick_gelu` decides where nothing else does and
    overrides (with a warning) what the weights say. open_clip 3.x builds RN50, RN101, ViT-B-32 and
    ViT-B-16 with nn.GELU, which changes every feature of OpenAI's weights."""
    built = bool((open_clip.get_model_config(cfg.model) or {}).get("quick_gelu", False))
    if built and cfg.quick_gelu is False:
        raise ConfigError(f"backbone.quick_gelu=false conflicts with backbone.model={cfg.model}, which is built "
                          "with QuickGELU; use the model name without -quickgelu or drop backbone.quick_gelu")
    if pretrained is None:
        trained, source = None, "random weights"
    elif Path(pretrained).is_file():
        trained = True if is_openai_checkpoint(pretrained) else None
        source = f"the checkpoint {pretrained}"
    else:
        trained = bool(open_clip.get_pretrained_cfg(cfg.model, pretrained).get("quick_gelu", False))
        source = f"pretrained={pretrained}"
    if trained is None and built:
        trained = True
    if cfg.quick_gelu is not None:
        if trained is not None and trained != cfg.quick_gelu:
            log.warning("backbone.quick_gelu=%s, but %s was trained with %s: its features will be wrong",
                        cfg.quick_gelu, source, "QuickGELU" if trained else "GELU")
        return cfg.quick_gelu
    if trained is None and pretrained is not None:
        log.warning("cannot tell which activation %s was trained with (not OpenAI's TorchScript format); "
                    "building %s with GELU. Set backbone.quick_gelu=true if it holds OpenAI-style weights",
                    source, cfg.model)
    return bool(trained)


def check_model_name(name: str) -> None:
    problem = model_problem(name)
    if problem:
        raise PromptlearnError(problem)


def load_backbone(cfg: BackboneConfig) -> FrozenCLIP:
    _locate_shipped_hf_files()  # again: open_clip.add_model_config rescans every config, relative names and all
    check_model_name(cfg.model)
    pretrained = _resolve_pretrained(cfg)
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg)  # before the model: a missing tokenizer file is named in seconds
    quick_gelu = quick_gelu_for(cfg, pretrained)
    # open_clip's file route refuses TorchScript archives (weights_only loading): read those here
    archive = pretrained if pretrained and Path(pretrained).is_file() and is_openai_checkpoint(pretrained) else None
    try:
        with torch.random.fork_rng(devices=[]):  # seeded init, without touching the caller's generator
            torch.manual_seed(RANDOM_INIT_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                cfg.model, pretrained=None if archive else pretrained, device=device, cache_dir=cfg.cache_dir,
                force_quick_gelu=quick_gelu,
                # random weights are random in both towers: no separate HF text weights from the hub
                pretrained_text=False)
        if archive:
            load_openai_archive(model, archive)
    except Exception as e:  # open_clip raises RuntimeError/OSError/HF errors for download and load faults
        text_model = hf_names(cfg.model).get("hf_model_name")
        if text_model and not Path(text_model).is_dir():
            raise PromptlearnError(missing_hf_files_message(
                cfg, "text tower", text_model, "model configuration (config.json)",
                "config.json", e)) from None
        if pretrained and Path(pretrained).is_file():
            raise PromptlearnError(
                f"could not load the checkpoint {pretrained} into {cfg.model}: {e}. Check that the file is "
                "an open_clip/OpenAI CLIP checkpoint of this architecture and not truncated.") from None
        raise PromptlearnError(
            f"could not load {cfg.model} with pretrained={cfg.pretrained!r}: {e}. If this machine is offline, "
            "download the weights elsewhere and pass the file with --pretrained PATH, point "
            "backbone.cache_dir at a cache that holds them, or use --pretrained none for random weights.") from None
    return FrozenCLIP(model, tokenizer, preprocess, cfg, device)


def hf_names(model: str) -> dict[str, str]:
    """The Hugging Face names a model config needs: its text model (hf_model_name) and tokenizer."""
    text_cfg = (open_clip.get_model_config(model) or {}).get("text_cfg", {})
    return {key: text_cfg[key] for key in HF_NAME_KEYS if text_cfg.get(key)}


def transformers_problem(model: str) -> str | None:
    """Why a model with a Hugging Face tokenizer or text tower cannot load here (no transformers), or None."""
    names = hf_names(model)
    if names and importlib.util.find_spec("transformers") is None:
        return (f"{model} needs the Hugging Face package transformers for {' and '.join(sorted(set(names.values())))}"
                ", which is not installed: pip install 'promptlearn[hf]' (or pip install transformers)")
    return None


def hf_cache_folder(cfg: BackboneConfig) -> str:
    if cfg.cache_dir:
        return str(cfg.cache_dir)
    from huggingface_hub import constants  # installed with transformers
    return constants.HF_HUB_CACHE


def missing_hf_files_message(cfg: BackboneConfig, what: str, repo: str, files: str, include: str,
                              error: Exception) -> str:
    return (f"the {what} of {cfg.model} comes from the Hugging Face repository {repo}, whose {files} are not "
            f"in the local Hugging Face cache {hf_cache_folder(cfg)} and could not be downloaded "
            f"({type(error).__name__}). On a machine with network run `huggingface-cli download {repo} --include "
            f"{include}` and copy "
            "its cache folder here (or point HF_HOME / backbone.cache_dir at a cache that holds it); with the files "
            "in the cache it works offline (set HF_HUB_OFFLINE=1 to skip the network).")


def load_tokenizer(cfg: BackboneConfig):
    """open_clip's tokenizer of the model: its BPE offline, a Hugging Face tokenizer from the local HF cache
    (or the hub); what is missing is named."""
    problem = transformers_problem(cfg.model)
    if problem:
        raise PromptlearnError(problem)
    try:
        return open_clip.get_tokenizer(cfg.model, cache_dir=cfg.cache_dir)
    except Exception as e:
        repo = hf_names(cfg.model).get("hf_tokenizer_name")
        if repo:
            raise PromptlearnError(missing_hf_files_message(
                cfg, "tokenizer", repo, "tokenizer files (tokenizer.json or spiece.model, tokenizer_config.json, "
                "special_tokens_map.json)", "'*token*' '*.model' special_tokens_map.json", e)) from None
        raise PromptlearnError(
            f"the tokenizer of {cfg.model} could not be loaded ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- model listing

def tower_kinds(model_cfg: dict) -> tuple[str, str]:
    """(vision tower kind, text tower kind) of an open_clip model config, as the docs' family table (docs/backbones.md)
    names them."""
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if vision.get("timm_model_name"):
        image = f"timm {vision['timm_model_name']}"
    else:
        image = "ModifiedResNet" if isinstance(vision.get("layers"), (list, tuple)) else "VisionTransformer"
    if "multimodal_cfg" in model_cfg:
        words = "CoCa (class token appended)"
    elif text.get("hf_model_name"):
        words = f"Hugging Face {Path(text['hf_model_name']).name}"
    elif text.get("no_causal_mask") and text.get("pool_type") == "last":
        words = "SigLIP-style (last token, bidirectional)"
    else:
        words = "TextTransformer (" + ("bidirectional" if text.get("no_causal_mask") else "causal") + \
            f", {text.get('pool_type', 'argmax')} pooling)"
    return image, words


def weights_cached(model: str, tag: str, cache_dir: str | None = None) -> bool:
    """Whether open_clip would find the weights of `model` / `tag` on this machine without a download."""
    pretrained = open_clip.get_pretrained_cfg(model, tag)
    hub = pretrained.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache  # an open_clip dependency
        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        return any(isinstance(try_to_load_from_cache(repo, name, cache_dir=cache_dir), str) for name in names)
    url = pretrained.get("url", "")
    folder = Path(cache_dir or Path("~/.cache/clip").expanduser())
    return bool(url) and (folder / os.path.basename(url)).is_file()


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs a random-weights warning per architecture built, through the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def count_parameters(model: str) -> int | None:
    """Parameters of the architecture, built on the meta device (no memory, no weights); None where
    it cannot be built offline (a Hugging Face text tower whose config is not cached)."""
    text_model = hf_names(model).get("hf_model_name")
    if text_model and not Path(text_model).is_dir():
        from huggingface_hub import try_to_load_from_cache
        if not isinstance(try_to_load_from_cache(text_model, "config.json"), str):
            return None  # building it would ask the hub for the config
    try:
        with torch.device("meta"), warnings.catch_warnings(), _quiet_open_clip():
            warnings.simplefilter("ignore")
            built = open_clip.create_model(model, pretrained=None, pretrained_text=False, device="meta")
    except Exception:  # any open_clip / timm / transformers failure: unknown, not fatal for a listing
        return None
    return sum(p.numel() for p in built.parameters())


def model_listing(names: list[str] | None = None, parameters: bool = True,
                  cache_dir: str | None = None) -> list[dict]:
    """One row per open_clip architecture (all of them, or `names`): its vision and text tower kinds,
    pretrained tags, embedding width, parameter count and which tags have their weights in the local
    cache. For `promptlearn list models`."""
    rows = []
    for name in names or open_clip.list_models():
        check_model_name(name)
        model_cfg = open_clip.get_model_config(name) or {}
        tags = open_clip.list_pretrained_tags_by_model(name)
        vision, text = tower_kinds(model_cfg)
        rows.append({"model": name, "vision": vision, "text": text, "tags": tags,
                     "embed_dim": model_cfg.get("embed_dim"),
                     "parameters": count_parameters(name) if parameters else None,
                     "cached_tags": [tag for tag in tags if weights_cached(name, tag, cache_dir)]})
    return rows
