"""FaST-VGS (Peng & Harwath, ICASSP 2022): the model family package.

* :mod:`~vgskit.models.fast_vgs.transformer` — the BERT layer, the LXMERT-style cross layer and the cross
  encoder, with the reference ``state_dict`` key map;
* :mod:`~vgskit.models.fast_vgs.audio` — the ResDAVEnet stage over the wav2vec2 frames;
* :mod:`~vgskit.models.fast_vgs.regions` — the region/box encoder of the image side;
* :mod:`~vgskit.models.fast_vgs.losses` — the margin InfoNCE loss on raw dot products;
* :mod:`~vgskit.models.fast_vgs.model` — :class:`FastVGS`, the assembled model, registered as ``fast_vgs``
  (the paper's sizes) and ``fast_vgs_tiny``.

Each block reproduces the reference implementation's outputs and gradients on the stored golden cases
(``tests/test_fastvgs_*_golden.py``).

Importing this package registers the two model names (the pretrained speech tower loads only when a model is
built).
"""

from vgskit.models.fast_vgs import commands  # noqa: F401  (registers ``vgskit convert fast_vgs``)
from vgskit.models.fast_vgs.audio import (
    ResDAVEnet,
    ResDAVEnetConfig,
    load_resdavenet_reference_state_dict,
    resdavenet_output_frames,
)
from vgskit.models.fast_vgs.losses import MarginInfoNCEConfig, MarginInfoNCELoss, margin_infonce_loss
from vgskit.models.fast_vgs.model import FastVGS, FastVGSConfig, default_speech_tower
from vgskit.models.fast_vgs.regions import (
    RegionEncoder,
    RegionEncoderConfig,
    load_region_encoder_reference_state_dict,
)
from vgskit.models.fast_vgs.transformer import (
    ATTENTION_MASK_VALUE,
    AttentionBlock,
    BareAttention,
    BertLayer,
    BertLayerConfig,
    CrossEncoder,
    CrossEncoderConfig,
    CrossLayer,
    FeedForward,
    additive_attention_mask,
    convert_reference_state_dict,
    load_reference_state_dict,
    reference_key_map,
)

__all__ = [
    "FastVGS",
    "FastVGSConfig",
    "default_speech_tower",
    "MarginInfoNCEConfig",
    "MarginInfoNCELoss",
    "RegionEncoder",
    "RegionEncoderConfig",
    "ResDAVEnet",
    "ResDAVEnetConfig",
    "load_region_encoder_reference_state_dict",
    "load_resdavenet_reference_state_dict",
    "margin_infonce_loss",
    "resdavenet_output_frames",
    "ATTENTION_MASK_VALUE",
    "AttentionBlock",
    "BareAttention",
    "BertLayer",
    "BertLayerConfig",
    "CrossEncoder",
    "CrossEncoderConfig",
    "CrossLayer",
    "FeedForward",
    "additive_attention_mask",
    "convert_reference_state_dict",
    "load_reference_state_dict",
    "reference_key_map",
]
