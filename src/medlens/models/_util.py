"""Helpers shared by the encoder families: input checks, batching, offline guidance."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import numpy as np

from medlens.errors import InputError, ModelUnavailable

T = TypeVar("T")
log = logging.getLogger(__name__)

# glibc mallopt(3) parameters (malloc.h) and the values inference runs with. By default
# glibc serves every block over 128 KiB (one 224 px image, any activation map) with a
# fresh mmap and unmaps it on free, so each batch faults its pages in again and the
# kernel zeroes them. With mmap off, freed blocks stay in the heap for the next batch
# (benchmarks/allocator.py on the 2-core box: system CPU per process 33.2 -> 1.1 s, the
# forward 1.2-2.6x faster, peak RSS +11 %).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
ALLOCATOR_SETTINGS: dict[int, int] = {
    _M_MMAP_MAX: 0,  # every block from the heap (mallopt caps the mmap threshold at 32 MiB,
    # below one batch-32 activation map)
    _M_TRIM_THRESHOLD: 512 << 20,  # keep up to 512 MiB freed at the heap's top for reuse
    _M_TOP_PAD: 64 << 20,  # grow the heap in 64 MiB steps
}


# -- resize and crop geometry (torchvision.transforms.v2's rules; no torch, so the ONNX
# engine's numpy preprocessing and models.mobilenet's torch one share them) -------------
def shorter_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) with the shorter side ``size`` and the longer one truncated, as
    torchvision's ``resize(img, [size])``."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return new_h, new_w


def center_crop_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    """(top, left) of the centred ``size`` x ``size`` crop (torchvision's rounding)."""
    return round((h - size) / 2.0), round((w - size) / 2.0)


# Threads per forward for this process when the server sets them (``registry.
# set_inference_threads``); None leaves torch's and ONNX Runtime's own choice.
INFERENCE_THREADS: list[int | None] = [None]


def check_images(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Enforce the Encoder contract (uint8 RGB (H, W, 3)) with a message that names the
    offending item, so a caller bug never turns into a silent mis-embedding."""
    out = []
    for i, img in enumerate(images):
        arr = np.asarray(img)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise InputError(
                f"image {i} has shape {arr.shape} and dtype {arr.dtype}; encoders take uint8 "
                "RGB arrays of shape (H, W, 3) (decode with medlens.io, which converts "
                "greyscale and RGBA to RGB)"
            )
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            raise InputError(f"image {i} is empty (shape {arr.shape})")
        out.append(arr)
    return out


def check_texts(texts: Sequence[str]) -> list[str]:
    """Reject a bare string (which would be embedded character by character)."""
    if isinstance(texts, str):
        raise InputError("embed_texts takes a list of strings, not a single string")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise InputError(f"text {i} is {type(t).__name__}, not str")
    return out


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    if size < 1:
        raise ValueError("batch size must be at least 1")
    for i in range(0, len(items), size):
        yield items[i : i + size]


def file_sha256(path: Path) -> str:
    """sha256 of a weight file, computed once per (path, size, mtime) in this process."""
    st = path.stat()
    return _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def offline_hint(repo: str | None, scheme: str) -> str:
    """How to point MedLens at a local copy: the same advice for every family."""
    repo_arg = repo or "<model id>"
    return (
        "To use it without internet access, download it on a connected machine with "
        f"`hf download {repo_arg} --local-dir DIR` (older huggingface_hub: "
        f"`huggingface-cli download {repo_arg} --local-dir DIR`), copy DIR here and use "
        f"--model {scheme}:DIR (or MEDLENS_MODEL={scheme}:DIR); or set HF_HOME to a "
        "populated Hugging Face cache"
    )


def hub_offline() -> bool:
    """Offline mode as huggingface_hub sees it (it reads the variable once, at import)."""
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        return bool(getattr(constants, "HF_HUB_OFFLINE", False))
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def unavailable(spec: str, reason: str, *, repo: str | None, scheme: str) -> ModelUnavailable:
    """One ModelUnavailable per failed load: the model, the first line of the cause, and
    how to provide a local copy."""
    mode = " (offline mode: HF_HUB_OFFLINE is set)" if hub_offline() else ""
    first_line = reason.strip().splitlines()[0].strip() if reason.strip() else "unknown error"
    if len(first_line) > 240:
        first_line = first_line[:240].rsplit(" ", 1)[0] + " …"
    return ModelUnavailable(
        f"model {spec!r} is not available{mode}: {first_line.rstrip('.')}. "
        f"{offline_hint(repo, scheme)}."
    )


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-load "Loading weights" bar for local files: it is noise in
    CLI output and logs when nothing is downloaded."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "these weights cannot be had here", across the hub stack:
    missing files, offline mode, refused connections, HTTP errors, bad checkpoints."""
    errors: list[type[BaseException]] = [OSError, RuntimeError, ValueError, KeyError]
    try:
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    except ImportError:  # pragma: no cover - huggingface_hub is a transformers dependency
        pass
    for mod, attr in (("httpx", "HTTPError"), ("requests", "RequestException")):
        with suppress(ImportError, AttributeError):
            errors.append(getattr(__import__(mod), attr))
    return tuple(errors)


def looks_like_path(target: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else with separators is a folder."""
    return (
        target.startswith(("/", "./", "../", "~", "."))
        or target.count("/") > 1
        or "\\" in target
        or (len(target) > 1 and target[1] == ":")
    )


def missing_extra(spec: str, exc: ImportError) -> ModelUnavailable:
    return ModelUnavailable(
        f"model {spec!r} needs a Python package that is not installed: "
        f"{str(exc).strip().splitlines()[0]}"
    )


def finish_embeddings(parts: list[np.ndarray], dim: int) -> np.ndarray:
    """Concatenate per-batch embeddings and re-normalise in float32 (half-precision
    models drift off the unit sphere)."""
    from medlens.models.base import l2_normalize

    if not parts:
        return np.zeros((0, dim), np.float32)
    return l2_normalize(np.concatenate(parts))


@lru_cache(maxsize=2)
def tune_allocator(enabled: bool = True) -> bool:
    """Apply ``ALLOCATOR_SETTINGS`` to this process's glibc malloc, once; whether they
    took. A no-op (False) when disabled (``MEDLENS_MALLOC_TUNING=0``) or off glibc (macOS,
    musl): the cost is speed, never correctness. Peak memory grows by what the largest
    batch frees, which the next batch reuses."""
    if not enabled or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in ALLOCATOR_SETTINGS.items())
    log.debug("malloc tuning %s", "applied" if ok else "not accepted by this libc")
    return ok
