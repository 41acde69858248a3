"""CLIP's text tower, with its token embeddings exposed.

``ClipTextEncoder(input_ids[B,L], attention_mask[B,L]) -> TextEncoderOutput`` gives per-token states
``[B, L, D]`` and the pooled text embedding ``[B, P]`` (the end-of-text state through CLIP's text
projection, i.e. CLIP's joint image-text space).

Cascaded SpeechCLIP does not feed token ids but *embeddings* (soft/straight-through keyword embeddings
placed as ``[SOT, kw1..kwK, EOT]``): :meth:`ClipTextEncoder.forward_embeddings` takes ``[B, L, D]``
embeddings plus the EOT position of each row, and :attr:`ClipTextEncoder.token_embedding` is the vocabulary
table those embeddings are compared with. ``forward`` itself goes through ``forward_embeddings``, so both
routes share one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vgskit.encoders.hub import TowerSource, load_hf_config, load_hf_model, resolve_tower
from vgskit.errors import ConfigError, VGSKitError


@dataclass
class TextEncoderOutput:
    """Output of a text encoder.

    Attributes:
        tokens: ``[B, L, D]`` final-layernorm token states.
        pooled: ``[B, P]`` text embedding (projected EOT state).
    """

    tokens: Tensor
    pooled: Tensor


@dataclass
class ClipTextConfig:
    """Configuration of :class:`ClipTextEncoder`.

    Attributes:
        name_or_path: alias (``"clip-vit-b32"``, ``"clip-vit-l14"``), hub id or local folder (a full CLIP
            checkpoint or a text-only one).
        freeze: no gradients, eval mode kept (gradients still flow *through* it into input embeddings).
        local_files_only: never use the network (``None``: follow the offline switches).
    """

    name_or_path: str = "clip-vit-b32"
    freeze: bool = True
    local_files_only: bool | None = None


def load_tokenizer(source: TowerSource) -> Any | None:
    """The tokenizer stored with a tower, or ``None`` when its folder has no tokenizer files.

    A local folder counts only with ``tokenizer.json`` or ``vocab.json``: without that check transformers
    may build an empty tokenizer that silently maps every word to ``<unk>``.
    """
    from transformers import AutoTokenizer

    if source.is_local and not any(
        (Path(source.name_or_path) / f).is_file() for f in ("tokenizer.json", "vocab.json")
    ):
        return None
    try:
        return AutoTokenizer.from_pretrained(source.name_or_path, local_files_only=source.local_files_only)
    except (OSError, ValueError, TypeError):
        # Weights without tokenizer files are still usable with ids or embeddings made elsewhere.
        return None


def load_clip_tokenizer(
    name_or_path: str | os.PathLike[str] | ClipTextConfig, *, local_files_only: bool | None = None
) -> Any | None:
    """CLIP's tokenizer for a text tower (alias, hub id, folder or :class:`ClipTextConfig`), without its weights.

    Returns ``None`` when the tower has no tokenizer files.
    """
    if isinstance(name_or_path, ClipTextConfig):
        local_files_only = name_or_path.local_files_only if local_files_only is None else local_files_only
        name_or_path = name_or_path.name_or_path
    return load_tokenizer(resolve_tower(name_or_path, local_files_only=local_files_only, need_weights=False))


class ClipTextEncoder(nn.Module):
    """CLIP text transformer + projection; see the module docstring."""

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        from transformers import CLIPTextModelWithProjection

        self.config = config
        source = resolve_tower(config.name_or_path, local_files_only=config.local_files_only)
        hf_config = load_hf_config(source, ("clip", "clip_text_model"))
        text_config = hf_config.text_config if hf_config.model_type == "clip" else hf_config
        # As for the vision tower: the projection size lives at the top of a full CLIP config.
        text_config.projection_dim = hf_config.projection_dim
        self.model = load_hf_model(source, CLIPTextModelWithProjection, text_config)
        self.width = int(text_config.projection_dim)
        self.token_width = int(text_config.hidden_size)
        self.max_length = int(text_config.max_position_embeddings)
        self.eos_token_id = int(text_config.eos_token_id)
        self.tokenizer = load_tokenizer(source)
        if config.freeze:
            for p in self.parameters():
                p.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> ClipTextEncoder:
        """Switch modes; a frozen tower stays in eval mode."""
        return super().train(mode and not self.config.freeze)

    @property
    def token_embedding(self) -> nn.Embedding:
        """The vocabulary embedding table (``weight`` is ``[V, D]``)."""
        return self.model.text_model.embeddings.token_embedding

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Token embeddings ``[B, L, D]`` of ``input_ids [B, L]`` (no positions added)."""
        return self.token_embedding(input_ids)

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """``(input_ids [B, L], attention_mask [B, L])`` of ``texts``, padded and truncated to ``max_length``."""
        if self.tokenizer is None:
            raise VGSKitError(
                f"text tower {self.config.name_or_path!r} has no tokenizer files (vocab.json, merges.txt, "
                "tokenizer_config.json); copy them from the hub repository into the folder"
            )
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def eot_positions(self, input_ids: Tensor) -> Tensor:
        """Position of the end-of-text token in each row ``[B]`` (the first one)."""
        is_eot = input_ids == self.eos_token_id
        if not bool(is_eot.any(dim=1).all()):
            # Old CLIP configs store eos_token_id=2 while the EOT id is the largest in the vocabulary.
            return input_ids.argmax(dim=1)
        return is_eot.int().argmax(dim=1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> TextEncoderOutput:
        """Encode token ids ``[B, L]``."""
        return self.forward_embeddings(self.embed_tokens(input_ids), self.eot_positions(input_ids), attention_mask)

    def forward_embeddings(
        self, inputs_embeds: Tensor, eot_positions: Tensor, attention_mask: Tensor | None = None
    ) -> TextEncoderOutput:
        """Encode token embeddings ``[B, L, D]`` whose end-of-text token sits at ``eot_positions [B]``.

        Positions are added here; attention is causal, as in CLIP, plus ``attention_mask`` (1 = keep).
        """
        b, length, _ = inputs_embeds.shape
        if length > self.max_length:
            raise ConfigError(f"text of {length} tokens exceeds CLIP's {self.max_length} positions")
        tm = self.model.text_model
        x = tm.embeddings(inputs_embeds=inputs_embeds)  # [B, L, D] with position embeddings
        # Additive causal (+ padding) mask [B, 1, L, L]; works with eager and SDPA attention.
        keep = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()[None, None]
        if attention_mask is not None:
            keep = keep & attention_mask.bool()[:, None, None, :]
        mask = (~keep).to(x.dtype) * torch.finfo(x.dtype).min
        x = tm.encoder(inputs_embeds=x, attention_mask=mask.expand(b, 1, length, length)).last_hidden_state
        x = tm.final_layer_norm(x)  # [B, L, D]
        eot = x[torch.arange(b, device=x.device), eot_positions.to(x.device)]  # [B, D]
        return TextEncoderOutput(tokens=x, pooled=self.model.text_projection(eot))
