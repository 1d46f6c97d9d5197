"""Typed errors. Every message says what went wrong and what to do about it.

The CLI and the API turn any `MedLensError` into a one-line message (exit code 2 / an
RFC 7807 problem), never a traceback.
"""


class MedLensError(Exception):
    """Base class for every error MedLens raises on purpose."""


class InputError(MedLensError):
    """The input file or text cannot be used."""


class UnsupportedImage(InputError):
    """The file is not an image format MedLens reads (or not an image at all)."""


class CorruptImage(InputError):
    """The file claims a supported format but cannot be decoded."""


class EmptyInput(InputError):
    """The file or text is empty."""


class ImageTooLarge(InputError):
    """The file exceeds the byte or pixel limits (decompression-bomb guard)."""


class OutOfDomain(InputError):
    """The input is not an image any knowledge pack covers (a CT or MR series, a
    radiograph of a hand): MedLens abstains rather than guess a diagnosis."""


class ExtremeAspectRatio(InputError):
    """The image is far longer than it is wide (or the reverse): not a photo or radiograph,
    and resizing its short side to the model's input would need gigabytes."""


class NoPixelData(InputError):
    """A DICOM object without pixel data (e.g. a structured report or a header-only file)."""


class InvalidText(InputError):
    """Symptom text that cannot be used (too long, binary, ...)."""


class InvalidContext(InputError):
    """Clinical context that cannot be used (an age of 200, an unknown body site, ...)."""


class ModelUnavailable(MedLensError):
    """Model weights are missing or cannot be loaded (e.g. offline without a local copy)."""


class ConfigError(MedLensError):
    """A setting or argument is invalid."""


class DatasetError(MedLensError):
    """A dataset folder does not have the layout its loader expects."""


class ClusterError(MedLensError):
    """Distributed runs: Ray is not installed (``pip install 'medlens[ray]'``), its cluster
    cannot be reached, or its workers do not run the same model as this process."""
