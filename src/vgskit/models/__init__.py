"""Retrieval models, built by name from dataclass configs (see :mod:`vgskit.models.registry`)."""

from vgskit.models.base import RetrievalModel
from vgskit.models.registry import (
    create_model,
    create_model_from_config,
    get_model_class,
    list_models,
    load_pretrained,
    model_config,
    register_model,
    save_pretrained,
)

# Importing a model module registers its names.
from vgskit.models.dual_encoder import DualEncoder, DualEncoderConfig  # noqa: E402  isort: skip
from vgskit.models.speechclip import SpeechCLIP, SpeechCLIPConfig  # noqa: E402  isort: skip
from vgskit.models.fast_vgs import FastVGS, FastVGSConfig  # noqa: E402  isort: skip
from vgskit.models.vg_hubert import VGHuBERT, VGHuBERTConfig  # noqa: E402  isort: skip
from vgskit.models.milan import Milan, MilanConfig  # noqa: E402, F401  isort: skip

__all__ = [
    "DualEncoder",
    "DualEncoderConfig",
    "FastVGS",
    "FastVGSConfig",
    "RetrievalModel",
    "SpeechCLIP",
    "SpeechCLIPConfig",
    "VGHuBERT",
    "VGHuBERTConfig",
    "create_model",
    "create_model_from_config",
    "get_model_class",
    "list_models",
    "load_pretrained",
    "model_config",
    "register_model",
    "save_pretrained",
]
