"""MedLens: one vision-language core for medical images.

Research software for decision support, never a diagnosis.
"""

from medlens.errors import MedLensError

__version__ = "0.1.0"
__all__ = ["MedLens", "MedLensError", "__version__"]


def __getattr__(name: str):
    # Lazy: `import medlens` stays cheap (no torch) until the facade is used.
    if name == "MedLens":
        from medlens.pipeline import MedLens

        return MedLens
    raise AttributeError(name)
