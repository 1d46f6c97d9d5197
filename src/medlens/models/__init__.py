"""Image–text encoders behind one protocol (``Encoder``), resolved from a spec string.

``load_encoder("lite")`` is the packaged offline model; ``open_clip:...`` and ``hf:...``
bring OpenCLIP and transformers checkpoints (see ``registry`` for the accepted forms);
``load_classifier("txv:<file>")`` a supervised chest X-ray classifier (``models.txv``).
Heavy libraries (torch, transformers, open_clip) are imported only when a family is
loaded.
"""

from typing import Any

from medlens.models.base import Encoder, l2_normalize
from medlens.models.registry import (
    ACCEPTED_FORMS,
    ModelSpec,
    clear_encoder_cache,
    is_classifier_spec,
    load_classifier,
    load_encoder,
    parse_model_spec,
)

__all__ = [
    "ACCEPTED_FORMS",
    "Encoder",
    "ModelSpec",
    "clear_encoder_cache",
    "is_classifier_spec",
    "l2_normalize",
    "load_classifier",
    "load_encoder",
    "parse_model_spec",
    "state_fingerprint",
]


def __getattr__(name: str) -> Any:
    """``state_fingerprint`` needs torch: imported on first use, not with the package."""
    if name == "state_fingerprint":
        from medlens.models._state import state_fingerprint

        return state_fingerprint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
