"""Symptom text: validation and zero-shot evidence against the findings' prompts.

Symptom text may contain identifying details, so it is never echoed into results,
logs or caches; results carry only a keyed hash of it (HMAC-SHA256 with the
installation's secret): a plain sha256 of a short text is reversed by guessing.
"""

from __future__ import annotations

import hashlib
import hmac
import unicodedata
from typing import TYPE_CHECKING

from medlens.errors import EmptyInput, InvalidText

if TYPE_CHECKING:
    from medlens.config import Settings


def normalised_text(
    text: object, max_chars: int, *, what: str, not_text: str, empty: str, too_long: str
) -> str:
    """NFC-normalised, stripped ``text`` or a clear error: ``not_text`` when it is not a
    string, ``empty`` when nothing is left, ``too_long`` (after "``what`` has N characters;
    the limit is M") when it exceeds ``max_chars``. Shared by every free-text input."""
    if not isinstance(text, str):
        raise InvalidText(not_text)
    text = unicodedata.normalize("NFC", text).strip()
    if not text:
        raise EmptyInput(empty)
    if len(text) > max_chars:
        raise InvalidText(f"{what} has {len(text)} characters; the limit is {max_chars}{too_long}")
    return text


def clean_symptoms(text: str | None, max_chars: int) -> str | None:
    """Normalise symptom text or raise a clear error for text that cannot be used."""
    if text is None:
        return None
    text = normalised_text(
        text,
        max_chars,
        what="the symptom description",
        not_text="symptoms must be text",
        empty="the symptom description is empty; omit it or describe the symptoms",
        too_long=" (MEDLENS_MAX_TEXT_CHARS): summarise the symptoms",
    )
    bad = sum(
        1
        for ch in text
        if unicodedata.category(ch) in {"Cc", "Cf", "Co", "Cs"} and ch not in "\n\t"
    )
    if bad > max(2, len(text) // 50):
        raise InvalidText("the symptom description looks like binary data, not text")
    letters = sum(ch.isalpha() for ch in text)
    if letters < 3:
        raise InvalidText("the symptom description has no words; describe the symptoms in words")
    return text


def text_hash(text: str, settings: Settings | None = None) -> str:
    """HMAC-SHA256 of ``text`` keyed with the installation secret of ``settings`` (the
    environment's when None): stable within one installation (the audit trail can match
    repeats), useless for guessing the text anywhere else."""
    if settings is None:
        from medlens.config import get_settings

        settings = get_settings()
    return hmac.new(settings.install_secret(), text.encode(), hashlib.sha256).hexdigest()
