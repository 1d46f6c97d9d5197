"""Zero-shot scoring by image–text alignment.

A finding is represented by the mean of its prompt embeddings (a prompt ensemble,
re-normalised). Single-label domains (a dermatology differential) take a softmax over
findings; multi-label domains (chest X-ray) score each finding against the domain's
"normal study" reference prompts with a two-way softmax, i.e. a sigmoid of the
scaled similarity difference.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np

from medlens.knowledge import KnowledgePack
from medlens.models.base import Encoder, l2_normalize

_memory: dict[str, np.ndarray] = {}
_lock = threading.Lock()


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


def _cache_key(encoder: Encoder, texts: list[list[str]]) -> str:
    h = hashlib.sha256(encoder.fingerprint.encode())
    for group in texts:
        h.update(b"\x1e".join(t.encode() for t in group))
        h.update(b"\x1d")
    return h.hexdigest()[:24]


def embed_prompt_sets(
    encoder: Encoder, prompt_sets: list[list[str]], cache_dir: Path | None = None
) -> np.ndarray:
    """One ensembled embedding per prompt set, cached per encoder fingerprint and text.

    Prompt embeddings are recomputed only when the encoder's weights or the prompts
    change: the key hashes both.
    """
    key = _cache_key(encoder, prompt_sets)
    with _lock:
        if key in _memory:
            return _memory[key]
    path = cache_dir / f"prompts_{key}.npy" if cache_dir else None
    if path is not None and path.is_file():
        out = np.load(path)
    else:
        flat = [t for group in prompt_sets for t in group]
        emb = encoder.embed_texts(flat)
        out, i = [], 0
        for group in prompt_sets:
            out.append(ensemble(emb[i : i + len(group)]))
            i += len(group)
        out = np.stack(out).astype(np.float32)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp.npy")
            np.save(tmp, out)
            tmp.replace(path)  # atomic: concurrent writers never leave half a file
    with _lock:
        _memory[key] = out
    return out


def finding_embeddings(
    encoder: Encoder, pack: KnowledgePack, cache_dir: Path | None = None
) -> np.ndarray:
    """(n_findings, dim) prompt-ensemble embeddings, in the pack's finding order."""
    return embed_prompt_sets(encoder, [list(f.prompts) for f in pack.findings], cache_dir)


def reference_embedding(
    encoder: Encoder, pack: KnowledgePack, cache_dir: Path | None = None
) -> np.ndarray:
    """(dim,) ensemble of the pack's "normal study" prompts (multi-label reference)."""
    return embed_prompt_sets(encoder, [list(pack.domain.reference_prompts)], cache_dir)[0]


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


def similarity_logits(image_emb: np.ndarray, class_emb: np.ndarray, scale: float) -> np.ndarray:
    """Scaled cosine similarities, (N, K)."""
    return float(scale) * (np.atleast_2d(image_emb) @ class_emb.T)


def single_label_probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax over findings: the probabilities of a differential sum to 1."""
    return softmax(np.atleast_2d(logits) / float(temperature), axis=1)


def multi_label_probs(
    logits: np.ndarray, reference_logit: np.ndarray, temperature: float = 1.0
) -> np.ndarray:
    """Per-finding probability against the reference ("normal") prompt.

    ``reference_logit`` is (N,) or (N, 1): the scaled similarity to the reference.
    """
    ref = np.asarray(reference_logit, dtype=np.float32).reshape(-1, 1)
    return sigmoid((np.atleast_2d(logits) - ref) / float(temperature))
