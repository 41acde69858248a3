"""SpeechCLIP building blocks: the speech branches that map frozen HuBERT features into a frozen CLIP's space.

The assembled, registered model is :class:`vgskit.models.speechclip.SpeechCLIP`, which also re-exports
every name defined here.

What is implemented here (the numerical core, checked against the reference implementation's outputs):

* :class:`ParallelBranch` (SpeechCLIP-P): a learnable CLS token (``randn``, std 1, **no positional
  encoding**) prepended to the weighted-layer-sum HuBERT frames, post-norm ``nn.TransformerEncoder``
  layer(s) + a final LayerNorm, CLS output → Linear to the CLIP width. The caller L2-normalises it.
* :class:`CascadedBranch` (SpeechCLIP-C) up to the keyword embeddings: ``K`` CLS tokens, one
  :class:`AttentionAndNorm` block (``LayerNorm(MHA(x) + x)``, one head, no FFN), Linear to CLIP's token
  width (or, as in a pre-release cascaded-large config, the MLP :class:`KeywordProjection`),
  :class:`KeywordBatchNorm` over all ``K × D`` values, cosine scores against the (reduced) CLIP
  vocabulary, :class:`CosineVectorQuantizer` (softmax at τ=0.1 with a hard straight-through estimator in
  training, exact one-hots at eval; pad/SOT/EOT ids masked), keyword embeddings = one-hot @ vocabulary.
  :func:`encode_keywords` places them as ``[SOT, kw_1..kw_K, EOT]`` into the frozen CLIP text tower
  (:meth:`vgskit.encoders.text.ClipTextEncoder.forward_embeddings`) and returns the projected EOT state.
* :func:`key_padding_mask`, :class:`SpeechClipWarmupDecay` (the reference's ``linear_warmup_decay``; defined
  in :mod:`vgskit.train.schedules` as the ``speechclip`` schedule, re-exported here) and
  :func:`convert_speechclip_state_dict` (reference state-dict keys → ours, for released checkpoints).
* The loss is :class:`vgskit.losses.InfoNCELoss` with ``dedup_images=False, max_logit_scale=None``
  (see :func:`speechclip_loss`); the layer weighting is
  :class:`vgskit.encoders.pretrained_speech.WeightedLayerSum`.

Deliberate differences from the reference (the reference behaviour is available behind a flag):

* Keyword BatchNorm init. Features are flattened as ``f = d·K + k`` (dim ``d``, keyword slot ``k``); the
  reference initialises weight/bias with ``std(E).repeat(K)`` / ``mean(E).repeat(K)``, which puts dim
  ``f % D``'s statistics on feature ``f`` although it belongs to dim ``f // K``. We initialise each feature
  from its own dim (``repeat_interleave``); ``reference_init=True`` reproduces the scrambled order. Both
  are learnable, so only the starting point differs; loaded checkpoints behave identically.
* The quantiser does not write ``-inf`` into its input in place (the reference mutates the caller's
  cosine scores); outputs and gradients are the same.
* The schedule holds ``final_lr`` from ``max_step - 1`` on; the reference keeps decaying and turns negative
  a few steps after ``max_step`` (its configs stop exactly at ``max_step``). ``hold_final=False`` matches it.

Paper hyperparameters (Flickr8k / SpokenCOCO; the recipes are ``vgskit/recipes/speechclip_*.yaml``):
frozen HuBERT base (13 states) or large (25 states, each layer-normed before the weighted sum) and CLIP
ViT-B/32 or ViT-L/14; parallel branch 1 layer, 8 heads, FFN 3072 (base) / 4096 (large), GELU, dropout
0.1; cascaded branch 8 keywords, 1 head; VQ temperature 0.1; reduced vocabulary (8,112 Flickr8k / 19,787
COCO subwords, counted over every caption of the corpus: train, dev and test); loss scale 1/0.07 fixed
(base) or learnable log-scale (large); Adam lr 1e-4, weight decay 1e-6, 5k warm-up steps, linear decay to
1e-8 at 50k steps, batch 256, fp16, gradient clipping 4; train-time random crop to 102,400 samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgskit.encoders.text import ClipTextEncoder
from vgskit.errors import ConfigError
from vgskit.layers import lengths_to_mask
from vgskit.losses import InfoNCELoss
from vgskit.train.schedules import SpeechClipWarmupDecay  # lives with the other LR schedules; re-exported


def key_padding_mask(lengths: Tensor, max_len: int) -> Tensor:
    """``[B, max_len]`` bool, **True on padding** (``t >= lengths[b]``), as attention's ``key_padding_mask``.

    A length of 0 gives an all-True row, a length beyond ``max_len`` an all-False one.
    """
    return ~lengths_to_mask(lengths, max_len)


# ---------------------------------------------------------------------------------------------------------
# Parallel branch
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ParallelBranchConfig:
    """Configuration of :class:`ParallelBranch` (defaults: SpeechCLIP-P base with CLIP ViT-B/32).

    Attributes:
        audio_dim: width of the speech frames (HuBERT base 768, large 1024).
        out_dim: CLIP embedding width (512 for ViT-B/32, 768 for ViT-L/14).
        num_layers: transformer layers.
        num_heads: attention heads.
        ffn_dim: feed-forward width.
        dropout: dropout inside the layers.
        layer_norm_eps: LayerNorm epsilon.
        projection: project the CLS output to ``out_dim`` (otherwise ``audio_dim`` must equal ``out_dim``).
    """

    audio_dim: int = 768
    out_dim: int = 512
    num_layers: int = 1
    num_heads: int = 8
    ffn_dim: int = 3072
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    projection: bool = True


class ParallelBranch(nn.Module):
    """CLS + post-norm transformer + final LayerNorm + projection of the CLS output.

    Args:
        config: the branch configuration.
        reference_init_order: draw the random initial values in the reference's order (transformer, then
            CLS, then projection) instead of ours (CLS first). Both give the same distributions; only a
            seeded run's values differ. The parameters are registered in the same order either way.
    """

    def __init__(self, config: ParallelBranchConfig, reference_init_order: bool = False):
        super().__init__()
        if not config.projection and config.audio_dim != config.out_dim:
            raise ConfigError(
                f"projection=False needs audio_dim == out_dim ({config.audio_dim} != {config.out_dim})"
            )
        self.config = config
        # Registered first (state-dict order), its value drawn where the chosen order says.
        self.cls = nn.Parameter(torch.empty(1, 1, config.audio_dim))
        if not reference_init_order:
            with torch.no_grad():
                self.cls.normal_()
        layer = nn.TransformerEncoderLayer(
            config.audio_dim,
            config.num_heads,
            config.ffn_dim,
            config.dropout,
            activation="gelu",
            layer_norm_eps=config.layer_norm_eps,
            batch_first=True,
            norm_first=False,
        )
        # No nested-tensor conversion: it zeroes padded positions under no_grad only, so the encoder output
        # would depend on whether autograd is on (the CLS output does not).
        self.encoder = nn.TransformerEncoder(
            layer,
            config.num_layers,
            norm=nn.LayerNorm(config.audio_dim, eps=config.layer_norm_eps),
            enable_nested_tensor=False,
        )
        if reference_init_order:
            with torch.no_grad():
                self.cls.normal_()
        self.proj = nn.Linear(config.audio_dim, config.out_dim) if config.projection else nn.Identity()

    def _source(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        b, t, _ = feats.shape
        src = torch.cat([self.cls.expand(b, -1, -1).to(feats.dtype), feats], dim=1)  # [B, 1+T, d]
        return src, key_padding_mask(lengths + 1, t + 1)  # [B, 1+T]

    def encode(self, feats: Tensor, lengths: Tensor) -> Tensor:
        """Full encoder output ``[B, 1+T, d]`` (CLS at position 0, final LayerNorm applied)."""
        src, mask = self._source(feats, lengths)
        return self.encoder(src, src_key_padding_mask=mask)

    def forward(self, feats: Tensor, lengths: Tensor) -> Tensor:
        """Speech embedding ``[B, out_dim]`` (not normalised) of frames ``[B, T, d]`` with ``lengths [B]``."""
        out = self.encode(feats, lengths)  # [B, 1+T, d]
        return self.proj(out[:, 0])  # [B, out_dim]

    def hidden_states(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
        """Encoder input and every layer's output, each ``[B, T, d]`` with the CLS removed (no final norm)."""
        x, mask = self._source(feats, lengths)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x, src_key_padding_mask=mask)  # [B, 1+T, d]
            states.append(x)
        return tuple(s[:, 1:] for s in states)


# ---------------------------------------------------------------------------------------------------------
# Cascaded branch
# ---------------------------------------------------------------------------------------------------------


class AttentionAndNorm(nn.Module):
    """``LayerNorm(MHA(x, x, x) + x)``: the cascaded branch's only block (no feed-forward)."""

    def __init__(self, dim: int, num_heads: int = 1, dropout: float = 0.1, layer_norm_eps: float = 1e-5):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim, eps=layer_norm_eps)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``x [B, L, d]``, ``key_padding_mask [B, L]`` (True = padding) → ``[B, L, d]``."""
        attended = self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]  # [B, L, d]
        return self.norm(attended + x)

    def attention_weights(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Attention probabilities ``[B, L, L]`` (query, key), averaged over heads.

        In training mode they include the attention dropout, as the block applies it; call in eval mode for
        the plain softmax.
        """
        return self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=True,
                         average_attn_weights=True)[1]


class KeywordBatchNorm(nn.Module):
    """BatchNorm over all ``K × D`` keyword values, initialised to the token embeddings' statistics.

    The keywords ``[B, K, D]`` are flattened as feature ``f = d·K + k``, as in the reference, so checkpoints
    load unchanged. See the module docstring for the init order (``reference_init``).

    Args:
        num_keywords: ``K``.
        dim: ``D``, the token-embedding width.
        learnable: learn the affine parameters (otherwise they stay at their init).
    """

    def __init__(self, num_keywords: int, dim: int, learnable: bool = True):
        super().__init__()
        self.num_keywords = num_keywords
        self.dim = dim
        self.bn = nn.BatchNorm1d(num_keywords * dim)
        self.bn.weight.requires_grad_(learnable)
        self.bn.bias.requires_grad_(learnable)

    @torch.no_grad()
    def init_from_embeddings(
        self, embeddings: Tensor, std_scale: float = 1.0, reference_init: bool = False
    ) -> None:
        """Set weight/bias from the per-dim (unbiased) std and mean of ``embeddings [V, D]``.

        ``reference_init=True`` uses the reference's ``repeat`` order (stats of dim ``f % D`` on feature
        ``f``); the default gives feature ``f`` the stats of its own dim ``f // K``.
        """
        if embeddings.shape[-1] != self.dim:
            raise ConfigError(f"token embeddings have width {embeddings.shape[-1]}, expected {self.dim}")
        std = embeddings.std(dim=0) * std_scale  # [D]
        mean = embeddings.mean(dim=0)  # [D]
        if reference_init:
            weight, bias = std.repeat(self.num_keywords), mean.repeat(self.num_keywords)
        else:
            weight = std.repeat_interleave(self.num_keywords)
            bias = mean.repeat_interleave(self.num_keywords)
        self.bn.weight.copy_(weight)
        self.bn.bias.copy_(bias)

    def forward(self, keywords: Tensor) -> Tensor:
        """``[B, K, D]`` → ``[B, K, D]`` (batch statistics in training, running ones at eval)."""
        b = keywords.shape[0]
        flat = keywords.transpose(1, 2).reshape(b, self.dim * self.num_keywords)  # [B, D·K], f = d·K + k
        out = self.bn(flat)
        return out.view(b, self.dim, self.num_keywords).transpose(1, 2)  # [B, K, D]


@dataclass
class QuantizerOutput:
    """Output of :class:`CosineVectorQuantizer`.

    Attributes:
        subword_prob: ``[B, K, V]`` one-hot (eval) or straight-through one-hot (train).
        targets: ``[B, K, 1]`` chosen vocabulary ids.
        code_perplexity: perplexity of the batch-mean one-hot.
        prob_perplexity: perplexity of the batch-mean ``softmax(x)`` (no temperature).
        ent_per_t: ``[K]`` batch-mean entropy of ``softmax(x)`` per keyword slot.
        diversity_loss: ``(V - prob_perplexity) / V`` (a diagnostic; SpeechCLIP does not train on it).
    """

    subword_prob: Tensor
    targets: Tensor
    code_perplexity: Tensor
    prob_perplexity: Tensor
    ent_per_t: Tensor
    diversity_loss: Tensor


def _perplexity(probs: Tensor) -> Tensor:
    return torch.exp(-torch.sum(probs * torch.log(probs + 1e-7), dim=-1))


class CosineVectorQuantizer(nn.Module):
    """Pick one vocabulary entry per keyword slot from (cosine) scores, with a hard straight-through.

    Training: forward value = one-hot of the argmax, gradient = that of ``softmax(x / τ)``. Eval: the exact
    one-hot (no gradient). Masked ids (pad/SOT/EOT) can never be chosen and get no gradient.

    Args:
        temperature: fixed softmax temperature ``τ`` (a buffer, so checkpoints carry it).
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.register_buffer("temperature", torch.tensor([temperature], dtype=torch.float32))

    def forward(self, scores: Tensor, masked_ids: Sequence[int] = (0, 2, 3)) -> QuantizerOutput:
        """``scores [B, K, V]`` → :class:`QuantizerOutput`."""
        b, k, v = scores.shape
        x = scores
        if len(masked_ids):
            col = torch.zeros(v, dtype=torch.bool, device=scores.device)
            col[list(masked_ids)] = True
            x = scores.masked_fill(col, float("-inf"))  # [B, K, V]
        ids = x.argmax(dim=-1)  # [B, K]
        hard = F.one_hot(ids, v).to(x.dtype)  # [B, K, V]
        with torch.no_grad():
            probs = torch.softmax(x, dim=-1)  # [B, K, V], no temperature: diagnostics only
            code_perplexity = _perplexity(hard.reshape(b * k, v).mean(dim=0))
            prob_perplexity = _perplexity(probs.reshape(b * k, v).mean(dim=0))
            ent_per_t = -(probs * torch.log(probs + 1e-9)).sum(dim=-1).mean(dim=0)  # [K]
        if self.training:
            soft = torch.softmax(x / self.temperature, dim=-1)  # [B, K, V]
            # Straight-through: the forward value is the one-hot, the gradient that of the soft assignment.
            subword_prob = hard + soft - soft.detach()
        else:
            subword_prob = hard
        return QuantizerOutput(
            subword_prob=subword_prob,
            targets=ids.unsqueeze(-1),
            code_perplexity=code_perplexity,
            prob_perplexity=prob_perplexity,
            ent_per_t=ent_per_t,
            diversity_loss=(v - prob_perplexity) / v,
        )


def cosine_scores(queries: Tensor, vocabulary: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine similarity ``[B, K, V]`` of ``queries [B, K, D]`` with every row of ``vocabulary [V, D]``.

    Computed as one matrix product divided by the norms (``F.cosine_similarity``'s formula, eps included),
    instead of broadcasting to ``[B, K, V, D]``, which a 20k-entry vocabulary would not fit in memory.
    """
    dots = queries @ vocabulary.T  # [B, K, V]
    q2 = queries.pow(2).sum(-1, keepdim=True)  # [B, K, 1]
    v2 = vocabulary.pow(2).sum(-1)  # [V]
    return dots / torch.sqrt((q2 * v2).clamp_min(eps * eps))


@dataclass
class CascadedBranchConfig:
    """Configuration of :class:`CascadedBranch` (defaults: SpeechCLIP-C base, the reference's Flickr8k vocabulary).

    Attributes:
        audio_dim: width of the speech frames.
        text_dim: CLIP token-embedding width.
        vocab_size: size of the (reduced) vocabulary the keywords are chosen from.
        num_keywords: ``K``.
        num_heads: attention heads of the keyword block.
        dropout: attention dropout.
        layer_norm_eps: LayerNorm epsilon.
        vq_temperature: straight-through softmax temperature.
        masked_ids: vocabulary ids never chosen (reduced-vocabulary ids of "!"/pad, SOT and EOT).
        bn_learnable: learn the keyword BatchNorm's affine parameters.
        bn_std_scale: factor on the token-embedding std used as BatchNorm weight init.
        bn_reference_init: reproduce the reference's scrambled BatchNorm init order.
        keyword_batchnorm: normalise the projected keywords with :class:`KeywordBatchNorm` before the vector
            quantiser (the paper's model). ``False`` is the paper's "w/o BN" ablation (Table 6): the branch
            then has no BatchNorm module and the cosine scores read the projected keywords directly.
        projection_hidden_dims: hidden widths of the keyword projection; empty (the released configs): one
            Linear ``audio_dim → text_dim``. ``(1024,)`` at large widths is the pre-release cascaded-large
            configs' MLP ``1024 → 1024 → 768`` (:class:`KeywordProjection`), which Table 1's 6.1 M trainable
            parameters of SpeechCLIP-C large count (the released configs give 5.0 M).
        projection_dropout: dropout between the layers of that MLP (the reference ``MLPLayers`` default 0.1).
    """

    audio_dim: int = 768
    text_dim: int = 512
    vocab_size: int = 8112
    num_keywords: int = 8
    num_heads: int = 1
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    vq_temperature: float = 0.1
    masked_ids: tuple[int, ...] = field(default=(0, 2, 3))
    bn_learnable: bool = True
    bn_std_scale: float = 1.0
    bn_reference_init: bool = False
    keyword_batchnorm: bool = True
    projection_hidden_dims: tuple[int, ...] = ()
    projection_dropout: float = 0.1


class KeywordProjection(nn.Module):
    """An MLP ``dims[0] → ... → dims[-1]``: Linear, then (ReLU, Dropout, Linear) per further layer.

    The layout is the reference's ``MLPLayers`` (its trailing ReLU and Dropout removed), so that a checkpoint
    holding the pre-release keyword projection (``linear_proj.sequential.{0,3}.*``) loads under the same
    indices (``proj.sequential.{0,3}.*``).
    """

    def __init__(self, dims: Sequence[int], dropout: float = 0.1):
        super().__init__()
        if len(dims) < 2:
            raise ConfigError(f"KeywordProjection needs at least an input and an output width, got {list(dims)}")
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i:
                layers += [nn.ReLU(), nn.Dropout(dropout)]
            layers.append(nn.Linear(int(d_in), int(d_out)))
        self.sequential = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., dims[0]]`` → ``[..., dims[-1]]``."""
        return self.sequential(x)


@dataclass
class CascadedBranchOutput:
    """Intermediate and final tensors of :class:`CascadedBranch` (shapes for ``K`` keywords, vocabulary ``V``).

    Attributes:
        keywords: ``[B, K, D]`` keyword embeddings (``subword_prob @ vocabulary``), input of CLIP's text tower.
        attention_out: ``[B, K+T, d]`` output of the attention block.
        kw_proj: ``[B, K, D]`` projected keyword slots.
        kw_bn: ``[B, K, D]`` after the keyword BatchNorm (``kw_proj`` itself without it).
        cos_score: ``[B, K, V]`` cosine scores (before masking).
        vq: quantiser output (``subword_prob``, ``targets`` ...).
    """

    keywords: Tensor
    attention_out: Tensor
    kw_proj: Tensor
    kw_bn: Tensor
    cos_score: Tensor
    vq: QuantizerOutput


class CascadedBranch(nn.Module):
    """``K`` CLS tokens → attention block → projection → BatchNorm → cosine VQ → keyword embeddings.

    Modules are created in the reference's order (CLS, attention, projection, quantiser, BatchNorm), so a
    seeded build draws the same random values and the state dict lists the same tensors in the same order
    as the reference's ``KW_CascadedBranch`` (the quantiser and the BatchNorm draw no random numbers).

    Args:
        config: the branch configuration.
        token_embedding: the frozen (reduced) vocabulary table to choose keywords from. When given (e.g.
            a CLIP text tower's table) it is shared, not registered, so it is neither saved twice nor
            trained; otherwise the branch owns a frozen table of ``vocab_size × text_dim``.
    """

    def __init__(self, config: CascadedBranchConfig, token_embedding: nn.Embedding | None = None):
        super().__init__()
        self.config = config
        k, d = config.num_keywords, config.audio_dim
        self.cls = nn.Parameter(torch.randn(1, k, d))
        self.attention = AttentionAndNorm(d, config.num_heads, config.dropout, config.layer_norm_eps)
        hidden = tuple(config.projection_hidden_dims)
        self.proj: nn.Module = (KeywordProjection((d, *hidden, config.text_dim), config.projection_dropout) if hidden
                                else nn.Linear(d, config.text_dim))
        self.vq = CosineVectorQuantizer(config.vq_temperature)
        self.batchnorm: KeywordBatchNorm | None = (
            KeywordBatchNorm(k, config.text_dim, learnable=config.bn_learnable) if config.keyword_batchnorm else None
        )
        if token_embedding is None:
            self.token_embedding: nn.Embedding | None = nn.Embedding(config.vocab_size, config.text_dim)
            self.token_embedding.weight.requires_grad_(False)
            self._shared: tuple[nn.Embedding, ...] = ()
        else:
            if tuple(token_embedding.weight.shape) != (config.vocab_size, config.text_dim):
                raise ConfigError(
                    f"token embedding {tuple(token_embedding.weight.shape)} != "
                    f"(vocab_size, text_dim) = {(config.vocab_size, config.text_dim)}"
                )
            self.token_embedding = None
            # A tuple hides the module from registration (no duplicate state-dict entry, no parameters()).
            self._shared = (token_embedding,)
        self.init_batchnorm()

    @property
    def vocabulary(self) -> Tensor:
        """The vocabulary table ``[V, D]`` (constant: no gradient flows into it)."""
        emb = self.token_embedding if self.token_embedding is not None else self._shared[0]
        return emb.weight.detach()

    def init_batchnorm(self) -> None:
        """(Re-)initialise the keyword BatchNorm from the vocabulary's statistics (nothing without one)."""
        if self.batchnorm is None:
            return
        self.batchnorm.init_from_embeddings(
            self.vocabulary, self.config.bn_std_scale, reference_init=self.config.bn_reference_init
        )

    def _source(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        b, t, _ = feats.shape
        k = self.config.num_keywords
        src = torch.cat([self.cls.expand(b, -1, -1).to(feats.dtype), feats], dim=1)  # [B, K+T, d]
        return src, key_padding_mask(lengths + k, t + k)  # [B, K+T]

    def keyword_attention(self, feats: Tensor, lengths: Tensor) -> Tensor:
        """Attention ``[B, K, T]`` of each keyword slot over the frames ``[B, T, d]`` (``lengths [B]``).

        Rows are the slots' attention probabilities (heads averaged) restricted to the frame keys: the
        part a slot spends on the ``K`` CLS tokens is left out, so a row sums to at most 1. Padded frames get
        0. Call in eval mode (in training the attention dropout is applied, as in the forward pass).
        """
        k = self.config.num_keywords
        src, mask = self._source(feats, lengths)
        return self.attention.attention_weights(src, mask)[:, :k, k:]  # [B, K, T]

    def forward(self, feats: Tensor, lengths: Tensor) -> CascadedBranchOutput:
        """Keywords of frames ``[B, T, d]`` with ``lengths [B]``; see :class:`CascadedBranchOutput`."""
        k = self.config.num_keywords
        src, mask = self._source(feats, lengths)  # [B, K+T, d], [B, K+T]
        attention_out = self.attention(src, mask)  # [B, K+T, d]
        kw_proj = self.proj(attention_out[:, :k])  # [B, K, D]
        kw_bn = self.batchnorm(kw_proj) if self.batchnorm is not None else kw_proj  # [B, K, D]
        vocab = self.vocabulary  # [V, D]
        cos_score = cosine_scores(kw_bn, vocab)  # [B, K, V]
        vq = self.vq(cos_score, self.config.masked_ids)
        keywords = vq.subword_prob @ vocab  # [B, K, D]
        return CascadedBranchOutput(keywords, attention_out, kw_proj, kw_bn, cos_score, vq)


def encode_keywords(text: ClipTextEncoder, keywords: Tensor, sot_id: int, eot_id: int) -> Tensor:
    """CLIP text embedding ``[B, P]`` of keyword embeddings ``[B, K, D]`` placed as ``[SOT, kw.., EOT]``.

    ``sot_id``/``eot_id`` index ``text.token_embedding`` (the full or reduced table the tower uses). The
    tower adds positions, applies its causal transformer and projects the EOT state (position ``K + 1``).
    Gradients flow through a frozen tower into ``keywords``.
    """
    b, k, _ = keywords.shape
    table = text.token_embedding.weight
    sot = table[sot_id].to(keywords.dtype).expand(b, 1, -1)  # [B, 1, D]
    eot = table[eot_id].to(keywords.dtype).expand(b, 1, -1)  # [B, 1, D]
    embeds = torch.cat([sot, keywords, eot], dim=1)  # [B, K+2, D]
    eot_positions = torch.full((b,), k + 1, dtype=torch.long, device=keywords.device)
    return text.forward_embeddings(embeds, eot_positions).pooled


# ---------------------------------------------------------------------------------------------------------
# Loss and schedule
# ---------------------------------------------------------------------------------------------------------


def speechclip_loss(learnable_temperature: bool = False, init_temperature: float = 0.07) -> InfoNCELoss:
    """SpeechCLIP's ``MaskedContrastiveLoss``: scale ``1/0.07`` fixed (base) or learnable (large), no clamp."""
    return InfoNCELoss(
        init_temperature=init_temperature,
        learnable_temperature=learnable_temperature,
        max_logit_scale=None,
        dedup_images=False,
    )


# ---------------------------------------------------------------------------------------------------------
# Checkpoint conversion
# ---------------------------------------------------------------------------------------------------------

# Ordered (reference infix, our infix) pairs; the first match wins within one key.
_KEY_RULES: tuple[tuple[str, str], ...] = (
    ("self_att.model.layers.", "encoder.layers."),
    ("self_att.model.norm.", "encoder.norm."),
    ("self_att.multihead_attn_layer.", "attention.attn."),
    ("self_att.attentionBlock_Norm.", "attention.norm."),
    ("linear_proj.", "proj."),
    ("bn_layer.bn_layer.", "batchnorm.bn."),
    ("bn_layer.", "bn."),
    ("vector_quantizer.curr_temp", "vq.temperature"),
    ("curr_temp", "temperature"),
    ("clip.model.token_embedding.weight", "token_embedding.weight"),
)
_TOP_LEVEL = {
    "parallel_branch.": "parallel.",
    "cascaded_branch.": "cascaded.",
    "criterion.temperature": "loss.logit_scale",
}
#: Constant mask buffers that the reference loss (``MaskedContrastiveLoss``) registers: ``eye(256)`` as bool, its
#: negation and a float copy. Every released checkpoint carries them, though they hold no trained value; ours
#: builds its masks from the batch, so they are dropped (only ``criterion.temperature`` is a weight).
REFERENCE_LOSS_BUFFERS = ("criterion.eye_mat", "criterion.neg_eye_mat", "criterion.eye_mat_fl")


def _convert_branch_key(key: str) -> str | None:
    if key == "temperature":  # a bare MaskedContrastiveLoss state dict
        return "logit_scale"
    if key == "weights" or key == "cls":
        return key
    for old, new in _KEY_RULES:
        if key.startswith(old):
            return new + key[len(old) :]
    if key.startswith("clip."):
        return None  # the rest of the frozen CLIP tower: our text tower loads its own weights
    raise KeyError(f"unknown SpeechCLIP state-dict key {key!r}")


def convert_speechclip_state_dict(ref_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map SpeechCLIP reference state-dict keys to ours (tensors shared, not copied).

    Accepts a branch-level state dict (keys such as ``cls``, ``self_att.model.layers.0...``,
    ``bn_layer.bn_layer.weight``, ``vector_quantizer.curr_temp``, ``clip.model.token_embedding.weight``),
    a bare ``Kw_BatchNorm`` / ``SimpleVectorQuantizer`` / ``WeightedSumLayer`` / ``MaskedContrastiveLoss``
    state dict, or a released full-model checkpoint's ``state_dict`` (``parallel_branch.*`` → ``parallel.*``,
    ``cascaded_branch.*`` → ``cascaded.*``, ``criterion.temperature`` → ``loss.logit_scale``,
    ``*weightedsum_layer.weights`` → ``layer_sum.weights``). Frozen towers (``clip.*`` except the
    cascaded branch's reduced token embedding, ``audio_encoder.*``) are dropped: our towers load their own
    pretrained weights. So are the loss's constant mask buffers (:data:`REFERENCE_LOSS_BUFFERS`). The reduced token embedding comes out as ``cascaded.token_embedding.weight``, the
    key of a stand-alone :class:`CascadedBranch`; the assembled model holds no such key (it reads the rows
    from its text tower), so convert a released checkpoint for it with
    :func:`vgskit.models.speechclip.convert.load_reference_checkpoint`, which checks that table instead.

    Raises:
        KeyError: a key that belongs to no known module (nothing is silently lost).
    """
    full = any(k.startswith(tuple(_TOP_LEVEL)) for k in ref_state_dict)
    out: dict[str, Tensor] = {}
    for key, value in ref_state_dict.items():
        if full:
            if key.endswith("weightedsum_layer.weights"):
                out["layer_sum.weights"] = value
                continue
            if key.startswith(("clip.", "audio_encoder.")) or key in REFERENCE_LOSS_BUFFERS:
                continue
            if key in _TOP_LEVEL:
                out[_TOP_LEVEL[key]] = value
                continue
            prefix = next((p for p in _TOP_LEVEL if key.startswith(p)), None)
            if prefix is None:
                raise KeyError(f"unknown SpeechCLIP checkpoint key {key!r}")
            mapped = _convert_branch_key(key[len(prefix) :])
            if mapped is not None:
                out[_TOP_LEVEL[prefix] + mapped] = value
            continue
        mapped = _convert_branch_key(key)
        if mapped is not None:
            out[mapped] = value
    return out


__all__ = [
    "REFERENCE_LOSS_BUFFERS",
    "AttentionAndNorm",
    "CascadedBranch",
    "CascadedBranchConfig",
    "CascadedBranchOutput",
    "CosineVectorQuantizer",
    "KeywordBatchNorm",
    "KeywordProjection",
    "ParallelBranch",
    "ParallelBranchConfig",
    "QuantizerOutput",
    "SpeechClipWarmupDecay",
    "convert_speechclip_state_dict",
    "cosine_scores",
    "encode_keywords",
    "key_padding_mask",
    "speechclip_loss",
]
