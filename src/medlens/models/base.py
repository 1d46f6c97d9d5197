"""The ``Encoder`` protocol every image–text model implements.

Contract:
- ``embed_images(images)``: a sequence of uint8 RGB arrays (H, W, 3) of any size →
  float32 (N, dim), each row L2-normalised. The encoder applies its own preprocessing.
- ``embed_texts(texts)``: a sequence of strings → float32 (N, dim), L2-normalised.
- ``fingerprint``: short hex string that changes whenever weights or preprocessing change
  (keys prompt caches, embedding caches and vector collections).
- ``logit_scale``: the learned temperature multiplier for cosine similarities.

No torch here: the analysis path imports this module, and an encoder served by ONNX
Runtime (``models.onnx_lite``) must not pay for ``import torch``; torch-side helpers
(``state_fingerprint``, ``StateKey``) live in ``models._state``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Encoder(Protocol):
    name: str
    dim: int
    fingerprint: str
    logit_scale: float

    def embed_images(self, images: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray: ...


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
