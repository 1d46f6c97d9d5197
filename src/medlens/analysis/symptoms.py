"""Symptom text: validation and zero-shot evidence against the findings' prompts.

Symptom text may contain identifying details, so it is never echoed into results,
logs or caches; results carry only its sha256.
"""

from __future__ import annotations

import hashlib
import unicodedata

from medlens.errors import EmptyInput, InvalidText


def clean_symptoms(text: str | None, max_chars: int) -> str | None:
    """Normalise symptom text or raise a clear error for text that cannot be used."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise InvalidText("symptoms must be text")
    text = unicodedata.normalize("NFC", text).strip()
    if not text:
        raise EmptyInput("the symptom description is empty; omit it or describe the symptoms")
    if len(text) > max_chars:
        raise InvalidText(
            f"the symptom description has {len(text)} characters; the limit is {max_chars} "
            "(MEDLENS_MAX_TEXT_CHARS): summarise the symptoms"
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


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
