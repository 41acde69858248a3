"""Adapters that let other evaluation frameworks run vgskit models.

* :mod:`vgskit.integrations.mteb` — any vgskit model as an `mteb <https://github.com/embeddings-benchmark/mteb>`_
  encoder (audio and image modalities), plus a cross-encoder for models with a fine scorer. Needs the ``mteb``
  extra: ``pip install 'vgskit[mteb]'``.

Importing this package does not import any framework; each adapter imports its framework when it is used.
"""

__all__ = ["mteb"]
