"""Safe decoding of images and DICOM into RGB pixels plus a study context.

Public contract (other modules rely on exactly this):

- ``load_image(source, *, filename=None, max_bytes=None, max_pixels=None) -> DecodedImage``
  ``source`` is a path or raw bytes. Limits default to ``medlens.config.get_settings()``.
- ``DecodedImage.pixels``: ``np.ndarray`` uint8, shape (H, W, 3), RGB, orientation applied.
- ``DecodedImage.context``: ``StudyContext`` (no direct identifiers; safe to log and store).
- ``DecodedImage.identifiers``: ``Identifiers`` (names, IDs, birth date, addresses,
  free-text comments); its repr/str never show values, and it is never logged, cached or
  indexed.
- ``DecodedImage.content_hash``: sha256 hex of the file bytes (cache and audit key).
- Errors: ``medlens.errors`` ``EmptyInput``, ``UnsupportedImage``, ``CorruptImage``,
  ``ImageTooLarge``, ``NoPixelData``.
"""

from medlens.io.types import DecodedImage, Identifiers, StudyContext

__all__ = ["DecodedImage", "Identifiers", "StudyContext", "load_image"]


def load_image(source, **kwargs) -> DecodedImage:  # thin lazy re-export, see images.py
    from medlens.io.images import load_image as _load

    return _load(source, **kwargs)
