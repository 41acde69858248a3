"""vgskit: visually grounded speech — models that learn from images paired with spoken captions."""

__version__ = "0.1.0"
