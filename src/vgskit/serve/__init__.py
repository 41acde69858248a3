"""``vgskit serve``: spoken-query image search over HTTP.

The web framework (FastAPI, uvicorn, python-multipart) is the optional ``serve`` extra: this package can be
imported without it; :func:`create_app` and the command need it and say which extra to install when missing::

    pip install 'vgskit[serve]'
    vgskit serve --checkpoint runs/demo --index demo=runs/demo/index

See :mod:`vgskit.serve.app` for the routes and :class:`vgskit.serve.limits.ServeLimits` for the limits.
"""

from __future__ import annotations

from typing import Any

from vgskit.serve.limits import ServeLimits, require_serve_extra

__all__ = ["ServeLimits", "create_app", "require_serve_extra"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """:func:`vgskit.serve.app.create_app` (imported on first use: it needs the ``serve`` extra)."""
    require_serve_extra()
    from vgskit.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)
