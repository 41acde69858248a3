"""Pretrained speech towers (HuBERT, wav2vec2 via transformers) behind the speech-encoder contract.

``PretrainedSpeechEncoder(wavs[B,T], lengths[B]) -> PretrainedSpeechOutput`` with every hidden state (the
transformer input and the output of each kept layer, as in transformers' ``output_hidden_states``), frame
lengths and the frame rate (50 Hz for the 20 ms CNN of HuBERT/wav2vec2).

The forward pass is written out over the transformers sub-modules (CNN, feature projection, positional
convolution, layers) rather than calling the model, because the recipes need things the model's own forward
cannot do: a learnable CLS token inserted before (FaST-VGS) or after (VG-HuBERT) the positional convolution,
exact padding invariance, and a frozen CNN that keeps no activations.

Padding: base models normalise the first CNN layer with GroupNorm *over time*, so zero padding changes the
features of every frame. With ``exact_padding=True`` (default) the CNN runs on each utterance's valid
samples alone, and the transformer masks padded frames, so an utterance gets the same states alone or in a
padded batch. Layer-norm CNNs (large models) are per frame and run batched.

Not reproduced: LayerDrop and SpecAugment-style time masking of the transformers model (the recipes that
fine-tune these towers do not use them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgskit.encoders.hub import (
    load_hf_config,
    load_hf_model,
    random_hf_config,
    read_preprocessor_config,
    resolve_tower,
)
from vgskit.errors import ConfigError
from vgskit.layers import SpeechEncoderOutput, lengths_to_mask

SPEECH_MODEL_TYPES = ("hubert", "wav2vec2")
CLSPosition = Literal["none", "before_pos_conv", "after_pos_conv"]


@dataclass(frozen=True)
class SpeechPreprocessing:
    """Waveform preprocessing a speech tower was trained with.

    Attributes:
        sample_rate: expected input rate in Hz.
        normalize: zero-mean unit-variance normalisation of each utterance over its valid samples.
    """

    sample_rate: int = 16000
    normalize: bool = False

    @classmethod
    def from_preprocessor_config(cls, data: dict[str, Any] | None, hf_config: Any) -> SpeechPreprocessing:
        """Read ``sampling_rate``/``do_normalize`` of a ``preprocessor_config.json``.

        Without that file, follow the fairseq convention the checkpoints were trained with: towers with a
        layer-norm CNN (large models) expect normalised waveforms, group-norm ones (base models) raw ones.
        """
        default_norm = getattr(hf_config, "feat_extract_norm", "group") == "layer"
        if not data:
            return cls(16000, default_norm)
        return cls(int(data.get("sampling_rate", 16000)), bool(data.get("do_normalize", default_norm)))


@dataclass
class PretrainedSpeechConfig:
    """Configuration of :class:`PretrainedSpeechEncoder`.

    Attributes:
        name_or_path: alias (``"hubert-base"``, see :data:`vgskit.encoders.hub.KNOWN_TOWERS`), hub id or a
            local ``save_pretrained`` folder.
        num_layers: keep only the first N transformer layers (``None``: all).
        reinit_last: re-initialise the last K kept layers (VG-HuBERT re-initialises layers 9-11).
        cls_position: ``"before_pos_conv"`` (FaST-VGS), ``"after_pos_conv"`` (VG-HuBERT) or ``"none"``.
        num_cls: number of learnable CLS tokens (initialised ``N(0, 1)``).
        freeze_cnn: no gradients into the waveform CNN (it runs under ``no_grad``).
        freeze: the whole tower is frozen and stays in eval mode (CLS tokens too).
        normalize_waveform: per-utterance normalisation; ``None`` takes it from the tower's preprocessing.
        exact_padding: run group-norm CNNs per utterance (see module docstring).
        local_files_only: never use the network (``None``: follow ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``).
        architecture: instead of loading ``name_or_path``, build a tower with **random weights** from these
            transformers config fields (``model_type`` ``"hubert"`` or ``"wav2vec2"`` plus sizes): towers trained
            from scratch, whose checkpoints then rebuild anywhere without a tower folder. 16 kHz input;
            waveforms normalised for layer-norm CNNs unless ``normalize_waveform`` says otherwise.
    """

    name_or_path: str = "hubert-base"
    num_layers: int | None = None
    reinit_last: int = 0
    cls_position: CLSPosition = "none"
    num_cls: int = 1
    freeze_cnn: bool = True
    freeze: bool = False
    normalize_waveform: bool | None = None
    exact_padding: bool = True
    local_files_only: bool | None = None
    architecture: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.cls_position not in ("none", "before_pos_conv", "after_pos_conv"):
            raise ConfigError(
                f"PretrainedSpeechConfig.cls_position must be 'none', 'before_pos_conv' or 'after_pos_conv', "
                f"got {self.cls_position!r}"
            )
        if self.num_layers is not None and self.num_layers < 0:
            raise ConfigError(f"PretrainedSpeechConfig.num_layers must be >= 0, got {self.num_layers}")
        if self.reinit_last < 0:
            raise ConfigError(f"PretrainedSpeechConfig.reinit_last must be >= 0, got {self.reinit_last}")
        if self.num_cls < 1:
            raise ConfigError(f"PretrainedSpeechConfig.num_cls must be >= 1, got {self.num_cls}")


@dataclass
class PretrainedSpeechOutput(SpeechEncoderOutput):
    """:class:`SpeechEncoderOutput` plus the CLS states (CLS positions are removed from the frames).

    Attributes:
        cls: ``[B, K, D]`` CLS tokens after the last layer, or ``None`` without CLS.
        cls_hidden_states: per hidden state ``[B, K, D]`` (aligned with ``hidden_states``), or ``None``.
    """

    cls: Tensor | None = None
    cls_hidden_states: tuple[Tensor, ...] | None = field(default=None)


def normalize_waveforms(wavs: Tensor, lengths: Tensor, eps: float = 1e-7) -> Tensor:
    """Zero-mean unit-variance per utterance over its valid samples; padding stays zero.

    Same formula as transformers' ``Wav2Vec2FeatureExtractor`` (``(x - mean) / sqrt(var + 1e-7)``), but
    computed on the padded batch without letting the padding shift the statistics.
    """
    mask = lengths_to_mask(lengths, wavs.shape[1]).to(wavs.dtype)  # [B, T]
    count = mask.sum(dim=1, keepdim=True).clamp(min=1.0)  # [B, 1]
    mean = (wavs * mask).sum(dim=1, keepdim=True) / count
    var = (((wavs - mean) * mask) ** 2).sum(dim=1, keepdim=True) / count
    return (wavs - mean) / torch.sqrt(var + eps) * mask


def reinit_transformer_layer(layer: nn.Module, std: float) -> None:
    """Re-initialise a transformer layer the BERT/fairseq way: Linear ``N(0, std)`` with zero bias, LayerNorm 1/0.

    Written out (instead of calling the model's ``_init_weights``) so the result does not depend on the
    transformers version's bookkeeping of already-initialised weights.
    """
    with torch.no_grad():
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()


class PretrainedSpeechEncoder(nn.Module):
    """HuBERT / wav2vec2 speech encoder: ``(wavs[B,T], lengths[B]) -> PretrainedSpeechOutput``.

    Attributes:
        config: the :class:`PretrainedSpeechConfig`.
        preprocessing: :class:`SpeechPreprocessing` read from the tower's files.
        width: hidden size ``D``.
        frame_rate: output frames per second.
        num_hidden_states: ``num_layers + 1`` (the transformer input, then one per layer).
    """

    def __init__(self, config: PretrainedSpeechConfig):
        super().__init__()
        from transformers import AutoModel

        self.config = config
        if config.architecture is not None:
            hf_config = random_hf_config(config.architecture, SPEECH_MODEL_TYPES, "PretrainedSpeechConfig.architecture")
            self.model = AutoModel.from_config(hf_config)
            preprocessor = None
        else:
            source = resolve_tower(config.name_or_path, local_files_only=config.local_files_only)
            hf_config = load_hf_config(source, SPEECH_MODEL_TYPES)
            self.model = load_hf_model(source, AutoModel, hf_config)
            preprocessor = read_preprocessor_config(source)
        self.hf_config = hf_config
        pre = SpeechPreprocessing.from_preprocessor_config(preprocessor, hf_config)
        if config.normalize_waveform is not None:
            pre = SpeechPreprocessing(pre.sample_rate, config.normalize_waveform)
        self.preprocessing = pre

        layers = self.model.encoder.layers
        total = len(layers)
        keep = total if config.num_layers is None else config.num_layers
        if keep > total:
            raise ConfigError(f"num_layers={keep} but {config.name_or_path!r} has only {total} layers")
        if config.reinit_last > keep:
            raise ConfigError(f"reinit_last={config.reinit_last} exceeds the {keep} kept layers")
        # Dropping the unused layers (not just skipping them) frees their memory and keeps them out of
        # optimisers and checkpoints.
        self.model.encoder.layers = nn.ModuleList(list(layers)[:keep])
        for layer in list(self.model.encoder.layers)[keep - config.reinit_last :] if config.reinit_last else []:
            reinit_transformer_layer(layer, float(getattr(hf_config, "initializer_range", 0.02)))
        # SpecAugment embedding and quantizer parts are unused by this forward; drop what exists.
        if hasattr(self.model, "masked_spec_embed"):
            self.model.masked_spec_embed = None

        self.width = int(hf_config.hidden_size)
        self.stable_layer_norm = bool(getattr(hf_config, "do_stable_layer_norm", False))
        self.frame_rate = pre.sample_rate / math.prod(int(s) for s in hf_config.conv_stride)
        self.num_hidden_states = keep + 1
        self.cls_tokens = (
            nn.Parameter(torch.randn(1, config.num_cls, self.width)) if config.cls_position != "none" else None
        )
        if config.freeze_cnn or config.freeze:
            for p in self.model.feature_extractor.parameters():
                p.requires_grad_(False)
        if config.freeze:
            for p in self.parameters():
                p.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> PretrainedSpeechEncoder:
        """Switch modes; a frozen tower stays in eval mode (no dropout) so its features are deterministic."""
        return super().train(mode and not self.config.freeze)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Number of valid frames for ``lengths`` valid samples (the CNN's size formula, at least 1)."""
        out = lengths.clone()
        for k, s in zip(self.hf_config.conv_kernel, self.hf_config.conv_stride, strict=True):
            out = torch.div(out - int(k), int(s), rounding_mode="floor") + 1
        return out.clamp(min=1)

    def _cnn(self, wavs: Tensor, lengths: Tensor, frames: Tensor) -> Tensor:
        # wavs [B, T] -> [B, T', C]
        extractor = self.model.feature_extractor
        grad = torch.is_grad_enabled() and not (self.config.freeze_cnn or self.config.freeze)
        with torch.set_grad_enabled(grad):
            group_norm = getattr(self.hf_config, "feat_extract_norm", "group") == "group"
            if group_norm and self.config.exact_padding:
                t_out = int(frames.max())
                feats = []
                for b in range(wavs.shape[0]):
                    f = extractor(wavs[b : b + 1, : int(lengths[b])])  # [1, C, T_b]
                    feats.append(F.pad(f, (0, t_out - f.shape[-1])))
                out = torch.cat(feats, dim=0)  # [B, C, T']
            else:
                out = extractor(wavs)[..., : int(frames.max())]  # [B, C, T']
        return out.transpose(1, 2)

    def forward(self, wavs: Tensor, lengths: Tensor) -> PretrainedSpeechOutput:
        """Encode ``wavs [B, T]`` (``lengths [B]`` valid samples each) at :attr:`preprocessing` ``.sample_rate``."""
        lengths = lengths.to(device=wavs.device, dtype=torch.long)
        wavs = wavs[:, : int(lengths.max())]
        if self.preprocessing.normalize:
            wavs = normalize_waveforms(wavs, lengths)
        else:
            wavs = wavs * lengths_to_mask(lengths, wavs.shape[1]).to(wavs.dtype)  # zero the padding
        frames = self.output_lengths(lengths)  # [B]
        feats = self._cnn(wavs, lengths, frames)  # [B, T', C]
        proj = self.model.feature_projection(feats)
        x = proj[0] if isinstance(proj, tuple) else proj  # wav2vec2 also returns the normalised CNN features
        mask = lengths_to_mask(frames, x.shape[1])  # [B, T'] True on valid frames
        x = x * mask.unsqueeze(-1).to(x.dtype)  # [B, T', D]

        enc = self.model.encoder
        k = 0
        if self.cls_tokens is not None:
            k = self.cls_tokens.shape[1]
            cls = self.cls_tokens.expand(x.shape[0], -1, -1).to(x.dtype)  # [B, K, D]
            ones = torch.ones(x.shape[0], k, dtype=torch.bool, device=x.device)
            full_mask = torch.cat([ones, mask], dim=1)  # [B, K+T']
        else:
            full_mask = mask
        if self.config.cls_position == "before_pos_conv":
            x = torch.cat([cls, x], dim=1)  # [B, K+T', D]: the CLS also feeds the positional convolution
        x = x + enc.pos_conv_embed(x)
        if self.config.cls_position == "after_pos_conv":
            x = torch.cat([cls, x], dim=1)  # [B, K+T', D]: the CLS carries no positional information
        if not self.stable_layer_norm:
            x = enc.layer_norm(x)  # post-norm models normalise the transformer input
        x = enc.dropout(x)

        # Additive mask [B, 1, 1, K+T']: works with both eager and SDPA attention of transformers.
        additive = (~full_mask)[:, None, None, :].to(x.dtype) * torch.finfo(x.dtype).min
        states = [x]
        for layer in enc.layers:
            out = layer(x, attention_mask=additive)
            x = out[0] if isinstance(out, tuple) else out  # older transformers return tuples
            states.append(x)
        if self.stable_layer_norm:
            states[-1] = enc.layer_norm(x)  # pre-norm models normalise the last layer's output

        valid = mask.unsqueeze(-1).to(x.dtype)  # [B, T', 1]
        frame_states = tuple(s[:, k:] * valid for s in states)  # each [B, T', D], padding zeroed
        cls_states = tuple(s[:, :k] for s in states) if k else None  # each [B, K, D]
        return PretrainedSpeechOutput(
            last_hidden_state=frame_states[-1],
            lengths=frames,
            frame_rate=self.frame_rate,
            hidden_states=frame_states,
            cls=cls_states[-1] if cls_states else None,
            cls_hidden_states=cls_states,
        )


class WeightedLayerSum(nn.Module):
    """Softmax-weighted sum of hidden states (SpeechCLIP): weights start at 0, i.e. a plain average.

    ``layer_norm=True`` normalises each state per frame (no affine) before summing, as SpeechCLIP does for
    large towers whose layers differ widely in scale. Zero (padded) frames stay zero.
    """

    def __init__(self, num_layers: int, layer_norm: bool = False):
        super().__init__()
        if num_layers < 1:
            raise ConfigError(f"WeightedLayerSum needs at least one layer, got {num_layers}")
        self.num_layers = num_layers
        self.layer_norm = layer_norm
        self.weights = nn.Parameter(torch.zeros(num_layers))

    def forward(self, hidden_states: tuple[Tensor, ...] | list[Tensor] | Tensor) -> Tensor:
        """Sum ``L`` states, each ``[B, T, D]`` (or a stacked ``[L, B, T, D]`` tensor) → ``[B, T, D]``."""
        stacked = hidden_states if isinstance(hidden_states, Tensor) else torch.stack(list(hidden_states))
        if stacked.shape[0] != self.num_layers:
            raise ConfigError(f"WeightedLayerSum expects {self.num_layers} states, got {stacked.shape[0]}")
        if self.layer_norm:
            stacked = F.layer_norm(stacked, stacked.shape[-1:])  # [L, B, T, D]
        w = torch.softmax(self.weights, dim=0).to(stacked.dtype)  # [L]
        return torch.einsum("l,lbtd->btd", w, stacked)
