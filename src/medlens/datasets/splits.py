"""Deterministic, seeded, grouped splits: records sharing a group never cross splits.

Unique groups are ordered by ``sha256("<seed>:<group>")`` and filled into consecutive
shares of the *records* in that order: a group goes to the share its records' midpoint
falls into. The result depends only on the seed and the groups with their sizes (no RNG
state, no platform differences), and the record fractions come out close to the target
even when group sizes vary (a patient with 20 images does not skew a split by 20 groups).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence

from medlens.errors import ConfigError


def group_key(seed: int, group: str) -> int:
    """Seeded hash rank of one group (first 8 bytes of the sha256)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big")


def assign_shares(groups: Sequence[str], shares: Sequence[float], seed: int) -> list[int]:
    """Index into ``shares`` for each record, given each record's group."""
    if not shares or any(s < 0 for s in shares) or sum(shares) <= 0:
        raise ValueError(f"shares must be non-negative and sum to > 0, got {list(shares)}")
    sizes = Counter(groups)
    total = sum(sizes.values())
    bounds: list[float] = []
    acc = 0.0
    for s in shares:
        acc += s / sum(shares)
        bounds.append(acc)
    which: dict[str, int] = {}
    done = 0
    for g in sorted(sizes, key=lambda g: (group_key(seed, g), g)):
        mid = (done + sizes[g] / 2) / total
        which[g] = next((i for i, b in enumerate(bounds) if mid < b), len(shares) - 1)
        done += sizes[g]
    return [which[g] for g in groups]


def grouped_split(groups: Sequence[str], fractions: Mapping[str, float], seed: int) -> list[str]:
    """Split name for each record (e.g. train/val/test by ``fractions``), grouped."""
    names = list(fractions)
    return [names[i] for i in assign_shares(groups, [fractions[n] for n in names], seed)]


def grouped_folds(groups: Sequence[str], n_folds: int, seed: int) -> list[int]:
    """Fold 0..n_folds-1 for each record, grouped, folds of near-equal record counts."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    return assign_shares(groups, [1.0] * n_folds, seed)


def check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """Validated split fractions (known split names, non-negative, summing to 1)."""
    out = {str(k): float(v) for k, v in fractions.items()}
    bad = set(out) - {"train", "val", "test"}
    if bad or any(v < 0 for v in out.values()) or abs(sum(out.values()) - 1) > 1e-6:
        raise ConfigError(f"fractions must map train/val/test to shares summing to 1: {out}")
    return out
