"""The ``Encoder`` protocol every image–text model implements.

Contract:
- ``embed_images(images)``: a sequence of uint8 RGB arrays (H, W, 3) of any size →
  float32 (N, dim), each row L2-normalised. The encoder applies its own preprocessing.
- ``embed_texts(texts)``: a sequence of strings → float32 (N, dim), L2-normalised.
- ``fingerprint``: short hex string that changes whenever weights or preprocessing change
  (keys prompt caches, embedding caches and vector collections).
- ``logit_scale``: the learned temperature multiplier for cosine similarities.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Encoder(Protocol):
    name: str
    dim: int
    fingerprint: str
    logit_scale: float

    def embed_images(self, images: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray: ...


def state_fingerprint(*modules: torch.nn.Module, extra: str = "") -> str:
    """Hash of all parameters and buffers (+ a preprocessing description)."""
    h = hashlib.sha256(extra.encode())
    for m in modules:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            t = v.detach().cpu().contiguous()
            if t.dtype == torch.bfloat16:
                t = t.float()
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


# Bumped whenever a module some ``StateKey`` watches registers a parameter, buffer or
# submodule (torch's global registration hooks); modules built elsewhere (a sliced
# ``nn.Sequential`` in a forward pass) do not count.
_STRUCTURE = [0]
_WATCHED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def _structure_changed(module: torch.nn.Module, *_: object) -> None:
    if module in _WATCHED:
        _STRUCTURE[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_structure_changed)
torch.nn.modules.module.register_module_parameter_registration_hook(_structure_changed)
torch.nn.modules.module.register_module_buffer_registration_hook(_structure_changed)


class StateKey:
    """A cheap key that changes whenever ``module``'s state could have: each tensor's
    storage and version counter (bumped by every in-place write, optimizer steps and
    ``load_state_dict`` included). Lists the tensors again only after a structural change
    (new parameter, buffer or submodule) in a watched module, so a warm key costs ~0.1 ms where
    ``state_dict()`` costs ~1 ms: encoders ask for their fingerprint several times per
    analysis."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._module = module
        self._generation = -1
        self._tensors: list[torch.Tensor] = []

    def __call__(self) -> tuple[int, tuple[tuple[int, int], ...]]:
        if self._generation != _STRUCTURE[0]:
            _WATCHED.update(self._module.modules())
            self._tensors = list(self._module.state_dict(keep_vars=True).values())
            self._generation = _STRUCTURE[0]
        return self._generation, tuple((t.data_ptr(), t._version) for t in self._tensors)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


# Views of an image for test-time augmentation (a domain's ``test_time_flips``).
FLIPS = {
    "horizontal": lambda a: a[:, ::-1],
    "vertical": lambda a: a[::-1],
    "both": lambda a: a[::-1, ::-1],
}


def flipped(image: np.ndarray, flip: str) -> np.ndarray:
    """An (H, W, C) image mirrored as ``flip`` names (a domain's ``test_time_flips``)."""
    return np.ascontiguousarray(FLIPS[flip](image))


def ensemble(embeddings: np.ndarray) -> np.ndarray:
    """Mean of unit vectors over the first axis, re-normalised: one direction for a set
    of phrasings, or per image for a stack of its views (V, N, D) → (N, D)."""
    return l2_normalize(np.asarray(embeddings, dtype=np.float32).mean(axis=0))
