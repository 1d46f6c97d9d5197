"""The YAML data files MedLens ships (knowledge packs, protocols, dataset registry, limits,
grammars), parsed with libyaml's C loader when PyYAML was built with it: the same safe
subset as ``yaml.safe_load``, several times faster (parsing the knowledge packs in pure
Python was over a second of a fresh process's first result)."""

from __future__ import annotations

from typing import Any

import yaml

LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` through ``LOADER``."""
    return yaml.load(text, Loader=LOADER)
