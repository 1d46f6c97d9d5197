"""The MedLens HTTP service: FastAPI app, API keys, bounded model pool, problem JSON.

>>> from medlens.api import create_app
>>> app = create_app()            # uvicorn medlens.api:create_app --factory
"""

from medlens.api.cases import CaseSearch

__all__ = ["CaseSearch", "create_app"]


def create_app(*args, **kwargs):  # lazy: importing medlens.api must stay cheap for the CLI
    from medlens.api.app import create_app as _create

    return _create(*args, **kwargs)
