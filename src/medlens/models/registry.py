"""Resolve a model spec string (``--model`` / ``MEDLENS_MODEL``) to a loaded Encoder.

Accepted forms::

    lite                                  the packaged offline encoder
    lite-v4                               an earlier packaged release (PACKAGED_LITE)
    lite:<heads.safetensors>              the lite towers with heads from a training run
    open_clip:<architecture>@<tag|file>   e.g. open_clip:ViT-B-32@openai
    open_clip:hf-hub:<org/repo>           e.g. BiomedCLIP
    open_clip:<local folder>              hub layout: open_clip_config.json + weights
    hf:<model id or local folder>         transformers CLIP / ALIGN / SigLIP
    lora:<run folder | adapter file>      a LoRA run of ``medlens train align --model
                                          <base>``: its recipe.json names the base
    <base spec>+lora:<run folder | file>  the same adapter on an explicitly named base
                                          (the base moved, e.g. to a local folder)
    txv:<state-dict file>                 a torchxrayvision DenseNet121 chest X-ray
                                          classifier (``load_classifier``, not an Encoder)

Loads are slow (seconds to minutes), so encoders are cached per (spec, device) for the
life of the process; encoders are frozen, so sharing one instance is safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from medlens.errors import ConfigError
from medlens.models._util import INFERENCE_THREADS, looks_like_path, tune_allocator
from medlens.models.base import Encoder

if TYPE_CHECKING:
    from medlens.models.txv import TxvClassifier

# Earlier releases of the packaged lite heads, kept loadable by name so old results can be
# reproduced and compared (docs/models/lite.md): name -> file in models/weights/.
PACKAGED_LITE = {
    # MobileNetV2 tail + heads trained on 28-px DermaMNIST (2026-11-23, fingerprint
    # 1d8defc5788d13c1): the default until the HAM10000/Derm7pt retrain.
    "lite-v4": "lite_heads_v4.safetensors",
}

ACCEPTED_FORMS = (
    "lite",
    *(f"{name} (an earlier packaged release)" for name in PACKAGED_LITE),
    "lite:<heads .safetensors file>",
    "open_clip:<architecture>@<pretrained tag or checkpoint file> (e.g. open_clip:ViT-B-32@openai)",
    "open_clip:hf-hub:<org/repo> (e.g. open_clip:hf-hub:microsoft/"
    "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224)",
    "open_clip:<local folder with open_clip_config.json and weights>",
    "hf:<model id or local folder> (transformers CLIP, ALIGN or SigLIP)",
    "lora:<run folder or adapter.safetensors of `medlens train align --model hf:…|open_clip:…`>",
    "<base spec>+lora:<run folder or adapter.safetensors> (the adapter on that base)",
    "txv:<torchxrayvision DenseNet121 state-dict file> (a chest X-ray classifier)",
)
# Schemes whose models are supervised classifiers (``load_classifier``), not Encoders.
CLASSIFIER_SCHEMES = ("txv",)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: ``scheme`` is lite, open_clip, hf, txv or lora (``target`` the
    adapter, ``tag`` an explicit base spec or None: the run's recipe names it)."""

    scheme: str
    target: str = ""
    tag: str | None = None


def _bad_spec(name: str, why: str) -> ConfigError:
    forms = "\n  ".join(ACCEPTED_FORMS)
    return ConfigError(f"model {name!r}: {why}. Accepted forms:\n  {forms}")


def parse_model_spec(name: str) -> ModelSpec:
    spec = name.strip()
    if spec == "lite":
        return ModelSpec("lite")
    if spec in PACKAGED_LITE:
        from medlens.models.lite import DEFAULT_HEADS_PATH

        return ModelSpec("lite", str(DEFAULT_HEADS_PATH.parent / PACKAGED_LITE[spec]))
    base, plus, adapter = spec.partition("+lora:")
    if plus or spec.startswith("lora:"):
        adapter = adapter if plus else spec[len("lora:") :]
        if not adapter.strip():
            raise _bad_spec(name, "nothing after lora:")
        if plus:
            if parse_model_spec(base).scheme not in ("open_clip", "hf"):
                raise _bad_spec(name, "a LoRA adapter needs an open_clip: or hf: base")
            return ModelSpec("lora", adapter.strip(), base.strip())
        return ModelSpec("lora", adapter.strip())
    scheme, sep, target = spec.partition(":")
    target = target.strip()
    if not sep or scheme not in ("lite", "open_clip", "hf", *CLASSIFIER_SCHEMES):
        raise _bad_spec(name, "unknown model scheme")
    if not target:
        raise _bad_spec(name, f"nothing after {scheme}:")
    if scheme == "open_clip":
        tag = None
        is_dir = Path(target).expanduser().is_dir()
        if not is_dir and not target.startswith(("hf-hub:", "local-dir:")) and "@" in target:
            target, tag = (part.strip() for part in target.rsplit("@", 1))
            if not target or not tag:
                raise _bad_spec(name, "empty architecture or pretrained tag around '@'")
        builtin = not (is_dir or target.startswith(("hf-hub:", "local-dir:")))
        if tag is None and builtin and not looks_like_path(target):
            # A bare architecture would load random weights: never what a user means.
            raise _bad_spec(
                name,
                f"open_clip architecture {target!r} needs a pretrained tag, e.g. "
                f"open_clip:{target}@openai (open_clip.list_pretrained() lists them)",
            )
        return ModelSpec("open_clip", target, tag)
    return ModelSpec(scheme, target)


def _check_device(device: str) -> str:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"device {device!r} is not a torch device (cpu, cuda, cuda:1, mps)"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here; use cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} requested but MPS is not available here; use cpu")
    return str(dev)


def load_encoder(name: str = "lite", *, device: str = "cpu") -> Encoder:
    """The encoder for a model spec, loaded once per (spec, device) in this process.

    Raises ConfigError for a malformed spec or device, ModelUnavailable (with how to
    provide a local copy) when the weights cannot be had.
    """
    spec = parse_model_spec(name)
    if spec.scheme in CLASSIFIER_SCHEMES:
        raise ConfigError(
            f"model {name!r} is a supervised classifier (fixed outputs, no text tower), not "
            "an image–text encoder: load it with load_classifier"
        )
    _tune_allocator()
    return _load_cached(spec, name.strip(), _check_device(device))


def _tune_allocator() -> None:
    """Inference is about to run in this process: let batches reuse freed memory."""
    from medlens.config import get_settings

    tune_allocator(get_settings().malloc_tuning)


def set_inference_threads(n: int) -> None:
    """Threads per forward for this process (the server's share of cores per worker):
    ONNX Runtime sessions opened from now on, and torch now if it is loaded, else when it
    is (an analysis on the ONNX engine may never need it)."""
    import sys

    INFERENCE_THREADS[0] = n
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def load_analysis_encoder(name: str, *, device: str, cache_dir: Path, onnx: bool) -> Encoder:
    """The encoder single-image analysis runs on: for a lite model on the CPU, its ONNX
    Runtime engine (``models.onnx_lite``: no ``import torch``, a faster forward), exported
    from the torch model the first time and whenever its files or code changed; anything
    else, or ``onnx=False``, or an engine that cannot be had, the torch encoder."""
    spec = parse_model_spec(name)
    if not onnx or spec.scheme != "lite" or device != "cpu":
        return load_encoder(name, device=device)
    from medlens.models import onnx_lite

    if (engine := onnx_lite.open_engine(name.strip(), device, cache_dir)) is not None:
        return engine
    enc = load_encoder(name, device=device)
    return onnx_lite.export(enc, name.strip(), cache_dir) or enc


def is_classifier_spec(name: str) -> bool:
    """Whether a model spec names a supervised classifier (``load_classifier``)."""
    return parse_model_spec(name).scheme in CLASSIFIER_SCHEMES


def load_classifier(name: str, *, device: str = "cpu") -> TxvClassifier:
    """The classifier for a ``txv:<file>`` spec, loaded once per (spec, device).

    Raises ConfigError for a spec that is not a classifier or a bad device,
    ModelUnavailable when the file is missing, corrupt or not the expected layout.
    """
    spec = parse_model_spec(name)
    if spec.scheme not in CLASSIFIER_SCHEMES:
        raise ConfigError(
            f"model {name!r} is an image–text encoder, not a classifier: load it with load_encoder"
        )
    return _load_classifier_cached(spec.target, name.strip(), _check_device(device))


@lru_cache(maxsize=4)
def _load_classifier_cached(target: str, name: str, device: str) -> TxvClassifier:
    from medlens.models.txv import TxvClassifier

    return TxvClassifier(target, device=device, name=name)


@lru_cache(maxsize=8)
def _load_cached(spec: ModelSpec, name: str, device: str) -> Encoder:
    if INFERENCE_THREADS[0]:
        import torch

        torch.set_num_threads(INFERENCE_THREADS[0])  # before the first forward
    return _load(spec, name, device)


def _load(spec: ModelSpec, name: str, device: str) -> Encoder:
    """A new encoder instance for ``spec`` (uncached: LoRA adapts its base in place)."""
    if spec.scheme == "lora":
        from medlens.models.lora import load_adapter

        def load_base(base: str) -> Encoder:
            base_spec = parse_model_spec(base)
            if base_spec.scheme not in ("open_clip", "hf"):
                raise _bad_spec(name, f"the adapter's base {base!r} is not open_clip: or hf:")
            return _load(base_spec, base.strip(), device)

        return load_adapter(spec.target, spec.tag, load_base, name=name)
    if spec.scheme == "lite":
        from medlens.models.lite import LiteEncoder

        enc = LiteEncoder.load(spec.target or None, device=device)
        enc.name = name  # "lite", or "lite:<heads file>" so reports say which heads
        return enc
    if spec.scheme == "open_clip":
        from medlens.models.open_clip_encoder import OpenClipEncoder

        return OpenClipEncoder(spec.target, spec.tag, device=device, name=name)
    from medlens.models.hf_encoder import HFEncoder

    return HFEncoder(spec.target, device=device, name=name)


def clear_encoder_cache() -> None:
    """Forget loaded encoders and classifiers (tests; after installing new lite heads)."""
    _load_cached.cache_clear()
    _load_classifier_cached.cache_clear()
