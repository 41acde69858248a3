"""Limits of the search service, and the check that its optional dependencies are installed.

Every limit protects the process from one kind of hostile or careless request; each has a default that fits a
spoken query (a few seconds of speech) with room to spare, and a command-line option of ``vgskit serve``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from vgskit.errors import ConfigError, VGSKitError

#: The packages of the ``serve`` extra, by import name (python-multipart is ``python_multipart`` since 0.0.13,
#: ``multipart`` before).
_EXTRA_MODULES = (("fastapi", ("fastapi",)), ("uvicorn", ("uvicorn",)),
                  ("python-multipart", ("python_multipart", "multipart")))


class ServeExtraMissing(VGSKitError):
    """The optional dependencies of ``vgskit serve`` are not installed."""


def require_serve_extra() -> None:
    """Raise :class:`ServeExtraMissing`, naming the extra to install, when a package of it is missing."""
    missing = [package for package, modules in _EXTRA_MODULES
               if not any(_importable(m) for m in modules)]
    if missing:
        raise ServeExtraMissing(
            f"the search service needs {', '.join(missing)} (the 'serve' extra): pip install 'vgskit[serve]'")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken package
        return False


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of the service.

    * ``max_upload_bytes`` (10 MiB): the request body, audio upload or JSON. 30 s of 48 kHz 24-bit stereo
      WAV is 8.2 MiB, so any query within ``max_audio_seconds`` fits uncompressed. Checked on the
      Content-Length header before anything is read, and again on the bytes actually received (a client may
      send no length, or lie about it); either way the answer is 413 naming the limit.
    * ``max_audio_seconds`` (30 s): a spoken query is a sentence; the speech encoder's time and memory grow
      with the length (quadratically for transformer towers). Read from the audio header before decoding; a
      longer query is refused with 413.
    * ``default_k`` (5) and ``max_k`` (100): hits per query; a larger ``k`` is refused with 422.
    * ``max_concurrent_searches`` (2): searches (decode, resample, encode, rank) running at once. Each one
      uses the model's intra-op threads, so more than a few in parallel only adds latency and memory. When
      all slots are taken the service answers 503 with ``Retry-After: retry_after_s`` at once, instead of
      queueing without bound.
    * ``cors_origins`` (none): origins allowed to call the service from a browser page of another origin. With
      none, no CORS header is sent, and browsers keep other sites' pages from reading the answers.
    """

    max_upload_bytes: int = 10 * 1024 * 1024
    max_audio_seconds: float = 30.0
    default_k: int = 5
    max_k: int = 100
    max_concurrent_searches: int = 2
    retry_after_s: int = 1
    cors_origins: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "default_k", "max_k", "max_concurrent_searches", "retry_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.max_audio_seconds, bool) or not (
                isinstance(self.max_audio_seconds, (int, float)) and self.max_audio_seconds > 0):
            raise ConfigError(f"max_audio_seconds must be a positive number, got {self.max_audio_seconds!r}")
        if self.default_k > self.max_k:
            raise ConfigError(f"default_k ({self.default_k}) must be <= max_k ({self.max_k})")
        origins = (self.cors_origins,) if isinstance(self.cors_origins, str) else tuple(self.cors_origins)
        for origin in origins:
            if not isinstance(origin, str) or not origin or "," in origin:
                raise ConfigError(f"cors_origins: each origin must be one non-empty string such as "
                                  f"'https://example.org' (or '*'), got {origin!r}")
        object.__setattr__(self, "cors_origins", origins)
