"""Exception types shared across vgskit.

Every error about an input names the offending file or value and says what is wrong with it, so that a
user can fix the data instead of reading a traceback.
"""

from __future__ import annotations

from pathlib import Path


class VGSKitError(Exception):
    """Base class of every error raised on purpose by vgskit."""


class InputFileError(VGSKitError, ValueError):
    """A single input file that cannot be used. ``path`` names it, ``problem`` says why."""

    kind = "file"

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.kind} {self.path}: {problem}")


class AudioError(InputFileError):
    kind = "audio file"


class ImageError(InputFileError):
    kind = "image file"


class ConfigError(VGSKitError, ValueError):
    """A configuration value that is missing, of the wrong type or out of range."""


class ManifestError(VGSKitError, ValueError):
    """A manifest with one or more problems; ``problems`` lists every one of them."""

    def __init__(self, path: str | Path, problems: list[str], summary: str | None = None):
        self.path = str(path)
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        head = summary or f"{len(self.problems)} problem(s)"
        super().__init__(f"manifest {self.path}: {head}\n  {shown}{more}")
