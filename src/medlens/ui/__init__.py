"""The MedLens clinician UI (Streamlit, ``ui/app.py``) and its API client.

Start it with ``medlens ui`` (the API must be running) or ``medlens demo`` (both).
"""

from medlens.ui.client import ApiClient, ApiError

__all__ = ["ApiClient", "ApiError"]
