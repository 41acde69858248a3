"""Shared assertion of the tiny-corpus training tests: recall well above a random ranking's."""

from __future__ import annotations

from typing import Any


def assert_well_above_chance(results: dict[str, Any], r1_factor: float = 4.0, r5_factor: float = 2.5) -> None:
    """R@1 at least ``r1_factor`` and R@5 at least ``r5_factor`` times chance, in both directions.

    ``results`` is :func:`vgskit.retrieval.evaluate.evaluate`'s dictionary (each direction carries ``chance_R@K``).
    """
    for direction in ("speech_to_image", "image_to_speech"):
        r = results[direction]
        assert r["R@1"] >= r1_factor * r["chance_R@1"], (direction, r)
        assert r["R@5"] >= r5_factor * r["chance_R@5"], (direction, r)
