"""Zero-shot scoring by image–text alignment.

A finding is represented by the mean of its prompt embeddings (a prompt ensemble,
re-normalised). Single-label domains (a dermatology differential) take a softmax over
findings; multi-label domains (chest X-ray) score each finding against the domain's
"normal study" reference prompts with a two-way softmax, i.e. a sigmoid of the
scaled similarity difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medlens.knowledge import KnowledgePack
from medlens.models.base import Encoder


def embed_prompt_sets(
    encoder: Encoder, prompt_sets: list[list[str]], cache_dir: Path | None = None
) -> np.ndarray:
    """One ensembled embedding per prompt set, (n_sets, dim).

    Memoised in this process per (encoder fingerprint, prompts); each prompt's vector is
    cached by its text's hash in the embedding cache under ``cache_dir`` (``None``: this
    process only), so prompts are embedded again only when the encoder or the prompt
    changes (see ``medlens.embeddings``).
    """
    from medlens import embeddings

    store = embeddings.open_store(cache_dir) if cache_dir is not None else None
    return embeddings.embed_prompt_sets(encoder, prompt_sets, store)


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


def scoring_embeddings(
    encoder: Encoder, pack: KnowledgePack, cache_dir: Path | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """What the scoring rule compares an image with: the findings' prompt ensembles and,
    for a multi-label pack, the "normal study" reference (None for single-label)."""
    cls = finding_embeddings(encoder, pack, cache_dir)
    ref = reference_embedding(encoder, pack, cache_dir) if pack.task == "multi_label" else None
    return cls, ref


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
