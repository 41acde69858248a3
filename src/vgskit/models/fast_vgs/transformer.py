"""FaST-VGS transformer blocks: BERT layer, LXMERT-style cross layer and the cross encoder.

FaST-VGS (Peng & Harwath, ICASSP 2022) stacks post-LN BERT layers in both towers and fuses the two
modalities with LXMERT-style cross layers before a small score MLP. These modules reproduce the
reference implementation (``jasonppy/FaST-VGS-Family``, ``models/utils.py`` and ``models/fast_vgs.py``)
number for number, including its less usual choices, because released checkpoints only behave as
published when every quirk is kept:

* the cross-attention of a cross layer is ONE module used in both directions (audio → visual and
  visual → audio share their weights);
* the per-modality self-attention of a cross layer is *bare*: query/key/value and softmax only, no
  output projection, no residual and no LayerNorm; the FFN's residual therefore skips the cross-attention;
* attention masks are additive ``[B, 1, 1, T_k]`` tensors (0 = keep, a large negative number = padding)
  added to the scaled scores before the softmax; padded query rows are still computed.

Parameter names are our own; :func:`reference_key_map` / :func:`convert_reference_state_dict` /
:func:`load_reference_state_dict` translate the reference ``state_dict`` keys (also used to convert
released checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgskit.errors import ConfigError

__all__ = [
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

ATTENTION_MASK_VALUE = -10000.0
"""What the reference adds to the scores of padded keys (finite, so fully padded rows stay defined)."""


def _erf_gelu(x: Tensor) -> Tensor:
    """Exact GELU spelled as the reference spells it (same value as ``F.gelu``; the same operation order
    keeps the rounding, and so the outputs, identical to the reference's)."""
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": _erf_gelu,
    "relu": F.relu,
    "swish": _swish,
}


@dataclass(frozen=True)
class BertLayerConfig:
    """Sizes of one BERT / cross layer (defaults: FaST-VGS, BERT-base sized).

    Attributes:
        hidden_size: model width ``H``.
        num_heads: attention heads (must divide ``hidden_size``).
        ffn_dim: width of the feed-forward intermediate layer.
        dropout: dropout after the attention output projection and the FFN output.
        attention_dropout: dropout on the attention probabilities.
        layer_norm_eps: LayerNorm epsilon (the reference hard-codes 1e-12).
        activation: FFN activation, ``"gelu"`` (exact erf), ``"relu"`` or ``"swish"``.
        initializer_range: std of the normal init of Linear weights (biases 0, LayerNorm 1/0).
    """

    hidden_size: int = 768
    num_heads: int = 12
    ffn_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; known: {sorted(_ACTIVATIONS)}")

    @classmethod
    def from_reference(cls, config: Mapping[str, Any]) -> BertLayerConfig:
        """Read the reference's BERT-style config names (``hidden_size``, ``num_attention_heads``,
        ``intermediate_size``, ``hidden_act``, ``*_dropout_prob``, ``initializer_range``); absent entries
        keep our defaults, so released ``args`` work too.

        ``layer_norm_eps`` is deliberately not read: the reference builds every LayerNorm of these blocks
        with a hard-coded ``eps=1e-12`` and ignores the config entry, so honouring it would change the
        numbers of a converted checkpoint. Override ``layer_norm_eps`` explicitly if a variant needs it.
        """
        defaults = cls()
        return cls(
            hidden_size=int(config.get("hidden_size", defaults.hidden_size)),
            num_heads=int(config.get("num_attention_heads", defaults.num_heads)),
            ffn_dim=int(config.get("intermediate_size", defaults.ffn_dim)),
            dropout=float(config.get("hidden_dropout_prob", defaults.dropout)),
            attention_dropout=float(config.get("attention_probs_dropout_prob", defaults.attention_dropout)),
            activation=str(config.get("hidden_act", defaults.activation)),
            initializer_range=float(config.get("initializer_range", defaults.initializer_range)),
        )


@dataclass(frozen=True)
class CrossEncoderConfig:
    """The FaST-VGS cross encoder: ``num_layers`` cross layers + score MLP ``2H → H → GELU → 1``.

    Attributes:
        layer: sizes of each cross layer.
        num_layers: number of cross layers (the reference's ``xtrm_layers``; 2 in the paper).
    """

    layer: BertLayerConfig = field(default_factory=BertLayerConfig)
    num_layers: int = 2

    @classmethod
    def from_reference(cls, args: Mapping[str, Any]) -> CrossEncoderConfig:
        """Read the reference's training ``args`` (BERT config names plus ``xtrm_layers``)."""
        return cls(
            layer=BertLayerConfig.from_reference(args),
            num_layers=int(args.get("xtrm_layers", cls.num_layers)),
        )


def additive_attention_mask(keep: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[B, T]`` keep mask (True / 1 = real frame) → the reference's additive ``[B, 1, 1, T]`` mask.

    The reference builds ``(1 - keep) * -10000`` once per tower and passes it to every layer; building it
    the same way keeps the padded keys' scores (and hence the softmax) identical.
    """
    keep = keep.to(dtype)  # [B, T]
    return (1.0 - keep[:, None, None, :]) * ATTENTION_MASK_VALUE  # [B, 1, 1, T]


def _init_weights(module: nn.Module, std: float) -> None:
    """The reference init: Linear N(0, std) with zero bias, LayerNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BareAttention(nn.Module):
    """Multi-head scaled dot-product attention: query/key/value projections and softmax, nothing else.

    Kept separate from the output projection because the cross layer uses it on its own (the reference's
    bare ``BertAttention``), and computed in the reference's order (scores / sqrt(d), + mask, softmax) so
    that results agree to rounding.
    """

    def __init__(self, config: BertLayerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_dropout)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).permute(0, 2, 1, 3)  # [B, h, T, d]

    def forward(self, query: Tensor, context: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        # query: [B, Tq, H]; context: [B, Tk, H]; attention_mask: additive [B, 1, 1, Tk] or None
        q = self._heads(self.q_proj(query))  # [B, h, Tq, d]
        k = self._heads(self.k_proj(context))  # [B, h, Tk, d]
        v = self._heads(self.v_proj(context))  # [B, h, Tk, d]
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # [B, h, Tq, Tk]
        if attention_mask is not None:
            scores = scores + attention_mask  # broadcast over heads and query rows
        probs = self.dropout(torch.softmax(scores, dim=-1))  # [B, h, Tq, Tk]
        out = torch.matmul(probs, v)  # [B, h, Tq, d]
        b, _, tq, _ = out.shape
        return out.permute(0, 2, 1, 3).contiguous().view(b, tq, -1)  # [B, Tq, H]


class AttentionBlock(nn.Module):
    """Attention + output projection + dropout + residual + LayerNorm (post-LN, as BERT).

    Serves as the BERT layer's self-attention (``context = query``) and as the cross layer's shared
    cross-attention (``context`` = the other modality).
    """

    def __init__(self, config: BertLayerConfig) -> None:
        super().__init__()
        self.attn = BareAttention(config)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, query: Tensor, context: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        # query: [B, Tq, H]; context: [B, Tk, H]; attention_mask: additive [B, 1, 1, Tk] or None
        attended = self.attn(query, context, attention_mask)  # [B, Tq, H]
        return self.norm(self.dropout(self.out_proj(attended)) + query)  # [B, Tq, H]


class FeedForward(nn.Module):
    """Position-wise FFN with residual and post-LN: ``LN(x + dropout(fc2(act(fc1(x)))))``."""

    def __init__(self, config: BertLayerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.ffn_dim)
        self.activation = _ACTIVATIONS[config.activation]
        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, T, H]
        hidden = self.activation(self.fc1(x))  # [B, T, F]
        return self.norm(self.dropout(self.fc2(hidden)) + x)  # [B, T, H]


class BertLayer(nn.Module):
    """Post-LN BERT layer: self-attention block, then FFN block.

    Used by both FaST-VGS towers (one layer on the audio frames, six on the image regions); the visual stack
    calls it without a mask.
    """

    def __init__(self, config: BertLayerConfig | None = None) -> None:
        super().__init__()
        self.config = config or BertLayerConfig()
        self.self_attn = AttentionBlock(self.config)
        self.ffn = FeedForward(self.config)
        _init_weights(self, self.config.initializer_range)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        # hidden_states: [B, T, H]; attention_mask: additive [B, 1, 1, T] or None
        attended = self.self_attn(hidden_states, hidden_states, attention_mask)  # [B, T, H]
        return self.ffn(attended)  # [B, T, H]


class CrossLayer(nn.Module):
    """LXMERT-style cross layer with the reference's structure (see the module docstring).

    1. shared cross-attention block: audio attends to visual (visual mask), visual attends to audio
       (audio mask), each ``LN(out_proj(att) + input)``;
    2. bare self-attention per modality (no projection, residual or LayerNorm);
    3. FFN + residual + LayerNorm per modality, the residual taken from the bare self-attention output.
    """

    def __init__(self, config: BertLayerConfig | None = None) -> None:
        super().__init__()
        self.config = config or BertLayerConfig()
        self.cross_attn = AttentionBlock(self.config)
        self.audio_self_attn = BareAttention(self.config)
        self.visual_self_attn = BareAttention(self.config)
        self.audio_ffn = FeedForward(self.config)
        self.visual_ffn = FeedForward(self.config)
        _init_weights(self, self.config.initializer_range)

    def forward(
        self,
        audio: Tensor,
        audio_mask: Tensor | None,
        visual: Tensor,
        visual_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        # audio: [B, Ta, H]; audio_mask: additive [B, 1, 1, Ta] or None
        # visual: [B, Tv, H]; visual_mask: additive [B, 1, 1, Tv] or None
        audio_x = self.cross_attn(audio, visual, visual_mask)  # [B, Ta, H]
        visual_x = self.cross_attn(visual, audio, audio_mask)  # [B, Tv, H]
        audio_s = self.audio_self_attn(audio_x, audio_x, audio_mask)  # [B, Ta, H]
        visual_s = self.visual_self_attn(visual_x, visual_x, visual_mask)  # [B, Tv, H]
        return self.audio_ffn(audio_s), self.visual_ffn(visual_s)  # [B, Ta, H], [B, Tv, H]


class CrossEncoder(nn.Module):
    """FaST-VGS fine matcher: cross layers over (audio, visual), then an MLP on the two CLS outputs.

    Position 0 of each sequence is its CLS token; the score MLP sees ``cat(audio_cls, visual_cls)`` (audio
    first, as in the reference) and returns one unnormalised matching score per pair.
    """

    def __init__(self, config: CrossEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or CrossEncoderConfig()
        width = self.config.layer.hidden_size
        self.layers = nn.ModuleList(CrossLayer(self.config.layer) for _ in range(self.config.num_layers))
        self.score_head = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, 1))
        _init_weights(self.score_head, self.config.layer.initializer_range)

    def fuse(
        self,
        audio: Tensor,
        audio_mask: Tensor | None,
        visual: Tensor,
        visual_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the cross layers; returns the fused audio ``[B, Ta, H]`` and visual ``[B, Tv, H]`` sequences."""
        for layer in self.layers:
            audio, visual = layer(audio, audio_mask, visual, visual_mask)  # [B, Ta, H], [B, Tv, H]
        return audio, visual

    def forward(
        self,
        audio: Tensor,
        audio_mask: Tensor | None,
        visual: Tensor,
        visual_mask: Tensor | None = None,
    ) -> Tensor:
        # audio: [B, Ta, H] (CLS at 0); audio_mask: additive [B, 1, 1, Ta] or None
        # visual: [B, Tv, H] (CLS at 0); visual_mask: additive [B, 1, 1, Tv] or None
        audio, visual = self.fuse(audio, audio_mask, visual, visual_mask)  # [B, Ta, H], [B, Tv, H]
        pair = torch.cat([audio[:, 0], visual[:, 0]], dim=-1)  # [B, 2H]
        return self.score_head(pair)  # [B, 1]


# ---------------------------------------------------------------------------------------------------------
# Reference key names
# ---------------------------------------------------------------------------------------------------------

_BARE_ATTENTION_KEYS: tuple[tuple[str, str], ...] = (
    ("q_proj.", "query."),
    ("k_proj.", "key."),
    ("v_proj.", "value."),
)


def _attention_block_keys(ref_attention: str, ref_output: str) -> tuple[tuple[str, str], ...]:
    """Our ``AttentionBlock`` prefixes → the reference's (bare attention + ``BertAttOutput``) prefixes."""
    return (
        *((f"attn.{own}", f"{ref_attention}{ref}") for own, ref in _BARE_ATTENTION_KEYS),
        ("out_proj.", f"{ref_output}dense."),
        ("norm.", f"{ref_output}LayerNorm."),
    )


def _feed_forward_keys(ref_inter: str, ref_output: str) -> tuple[tuple[str, str], ...]:
    return (
        ("fc1.", f"{ref_inter}dense."),
        ("fc2.", f"{ref_output}dense."),
        ("norm.", f"{ref_output}LayerNorm."),
    )


def _nest(own_prefix: str, pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((own_prefix + own, ref) for own, ref in pairs)


_BERT_LAYER_KEYS: tuple[tuple[str, str], ...] = (
    *_nest("self_attn.", _attention_block_keys("attention.self.", "attention.output.")),
    *_nest("ffn.", _feed_forward_keys("intermediate.", "output.")),
)

_CROSS_LAYER_KEYS: tuple[tuple[str, str], ...] = (
    *_nest("cross_attn.", _attention_block_keys("visual_attention.att.", "visual_attention.output.")),
    *((f"audio_self_attn.{own}", f"audio_self_att.{ref}") for own, ref in _BARE_ATTENTION_KEYS),
    *((f"visual_self_attn.{own}", f"visn_self_att.{ref}") for own, ref in _BARE_ATTENTION_KEYS),
    *_nest("audio_ffn.", _feed_forward_keys("audio_inter.", "audio_output.")),
    *_nest("visual_ffn.", _feed_forward_keys("visn_inter.", "visn_output.")),
)


def _prefix_rules(module: nn.Module) -> tuple[tuple[str, str], ...]:
    if isinstance(module, BertLayer):
        return _BERT_LAYER_KEYS
    if isinstance(module, CrossLayer):
        return _CROSS_LAYER_KEYS
    if isinstance(module, CrossEncoder):
        rules: list[tuple[str, str]] = [("score_head.0.", "fc.0."), ("score_head.2.", "fc.2.")]
        for i in range(len(module.layers)):
            rules.extend((f"layers.{i}.{own}", f"xtrm.{i}.{ref}") for own, ref in _CROSS_LAYER_KEYS)
        return tuple(rules)
    raise TypeError(f"no reference key map for {type(module).__name__}")


def reference_key_map(module: nn.Module) -> dict[str, str]:
    """Our ``state_dict`` key → the reference key, for a :class:`BertLayer`, :class:`CrossLayer` or
    :class:`CrossEncoder` (the reference's ``BertLayer``, ``LXMERTXLayer`` and ``CrossEncoder``).

    Derived from the module's own keys, so the map always covers exactly what the module holds.
    """
    rules = _prefix_rules(module)
    out: dict[str, str] = {}
    for key in module.state_dict():
        match = next(((own, ref) for own, ref in rules if key.startswith(own)), None)
        if match is None:  # a parameter added without a reference counterpart: a bug in this file
            raise KeyError(f"{type(module).__name__}.{key} has no reference key")
        own, ref = match
        out[key] = ref + key[len(own) :]
    return out


def convert_reference_state_dict(module: nn.Module, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename reference ``state_dict`` entries to ``module``'s keys (tensors shared, not copied).

    Raises:
        ConfigError: the key sets differ; the message lists the missing and the unexpected keys (both in reference
            names), as every FaST-VGS block loader does (:func:`vgskit.models.fast_vgs.audio.load_renamed_state_dict`).
    """
    own_to_ref = reference_key_map(module)
    expected = set(own_to_ref.values())
    missing = sorted(expected - set(params))
    unexpected = sorted(set(params) - expected)
    if missing or unexpected:
        raise ConfigError(
            f"{type(module).__name__} reference state dict does not fit the module: missing {missing}, "
            f"unexpected {unexpected} (reference names)"
        )
    return {own: params[ref] for own, ref in own_to_ref.items()}


def load_reference_state_dict(module: nn.Module, params: Mapping[str, Tensor]) -> nn.Module:
    """Load reference-named parameters into ``module`` (strict: key sets and shapes must match).

    Returns ``module`` so that construction and loading chain.
    """
    module.load_state_dict(convert_reference_state_dict(module, params), strict=True)
    return module
