"""Cross-Modal Denoising (CMD; Zhou et al., Interspeech 2024): parallel SpeechCLIP plus a training-only task.

CMD keeps the architecture of parallel SpeechCLIP for retrieval (paper §2.2 and Table 1):

* speech encoder ``Ψ``: frozen HuBERT-Large, a learnable weighted sum of its CNN output and every
  transformer layer, then ONE transformer layer (8 heads, HuBERT's width) with a CLS token, whose output is
  projected into CLIP's joint space (``S_cls``): the parallel branch of :class:`SpeechCLIP`;
* image encoder ``Φ``: frozen CLIP ViT-L/14; its projected CLS embedding is ``I_cls`` and its patch tokens
  ``i_1..i_N`` feed the denoising task.

Training adds **cross-modal denoising** (§2.2, eq. 1–2, 6–7): in every image's patch features a fraction
(``noise_ratio``, 30 % in §3.1) is replaced by patch features of *other* images of the batch
(:func:`swap_patches`); the fusion encoder ``Ω`` (:class:`FusionEncoder`) pools the noisy patches with the
caption's speech feature as the query, ``F' = LN(FC(Attn(I* | s)) + Attn(I* | s))``, and ``F'`` enters a
second contrastive loss against the speech features. The objective is ``L = L_sic + α · L_cmd``; both
contrastive losses use multi-positive targets (every caption of an image is a positive with probability
``1/n``, :class:`MultiPositiveInfoNCE`) and share one learnable temperature.

Decisions the paper leaves open (each is a config field, so the alternative is one override away):

* **Patch features in the joint space.** The FC is 768 → 768 (§3.1) and the fusion encoder is the FC plus an
  attentive pooling and a LayerNorm; ``S_cls`` lives in CLIP's 768-d joint space, while ViT-L/14's tokens
  are 1024-d. The patches are therefore taken to the joint space as CLIP takes its CLS token there: CLIP's
  own (frozen) final LayerNorm and visual projection, applied to every patch (:class:`PatchProjection`).
* **Attention without learned projections** (``fusion.project_qkv: false``). Table 1 counts 14M trainable
  parameters: 13.4M for the speech transformer (with its projection) and 0.6M for the FC, so the attentive
  pooling adds none: ``Q = s``, ``K = V = I*``. The query is the speech feature *before* its L2
  normalisation, so the attention's sharpness is learned through its norm (a unit query against
  ``√D``-scaled logits would leave the pooling nearly uniform). ``project_qkv: true`` adds learned
  ``D × D`` query/key/value maps.
* **Noise rule** (:func:`swap_patches`): per caption row, exactly ``k = ⌊ρ·N + ½⌋`` of the ``N`` patch
  positions (nearest integer, halves up: 77 of ViT-L/14's 256 at ρ = 0.3) are chosen uniformly at random;
  each chosen patch is replaced by the patch *at the same position* of another image of the batch, drawn
  uniformly, per patch, among the batch's *distinct* images other than the row's own. Captions of one
  image share its id, so a duplicate of the row's own image is never a donor. A batch with a single
  distinct image has no donor and is left clean.

The fusion encoder exists only for training. Its weights (and the patch projection, which belongs to
CLIP's frozen tower) are left out of the state dict, so a saved CMD model holds exactly the keys of a
parallel SpeechCLIP model (:meth:`CrossModalDenoising.to_speechclip` builds one); retrieval
(``encode_speech`` / ``encode_image``) never calls it. A training checkpoint keeps the fusion encoder's weights
beside the model's (:meth:`CrossModalDenoising.training_state`, the trainer's ``training_state.safetensors``), so a
resumed run continues with them, while the exported model never carries them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vgskit.contract import Batch, StepOutput, TrainState
from vgskit.encoders.pretrained_speech import PretrainedSpeechConfig
from vgskit.encoders.text import ClipTextConfig
from vgskit.errors import ConfigError
from vgskit.losses import InfoNCELoss, unique_images
from vgskit.models.registry import register_model
from vgskit.models.speechclip.blocks import speechclip_loss
from vgskit.models.speechclip.model import SpeechCLIP, SpeechCLIPConfig, speechclip_preset

#: Values of ``CMDConfig.positives``: the paper's multi-positive targets, or SpeechCLIP's masked loss.
POSITIVES = ("multi", "masked")
#: Attributes of :class:`CrossModalDenoising` that exist only for training (never in its state dict).
TRAINING_ONLY = ("fusion", "patch_projection")


# ---------------------------------------------------------------------------------------------------------
# Noise: patches of other images
# ---------------------------------------------------------------------------------------------------------


def num_swapped(num_patches: int, ratio: float) -> int:
    """Patches replaced per image: ``⌊ratio · num_patches + ½⌋`` (nearest integer, halves rounded up)."""
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"noise ratio must be in [0, 1], got {ratio!r}")
    # The small epsilon keeps binary round-off (0.3 * 5 = 1.4999999999999998) from moving a half down.
    return min(num_patches, int(math.floor(ratio * num_patches + 0.5 + 1e-9)))


@dataclass
class SwappedPatches:
    """The output of :func:`swap_patches`.

    Attributes:
        patches: ``[B, N, D]`` the noisy patch features of every caption row.
        replaced: ``[B, N]`` True where a patch was replaced.
        donor: ``[B, N]`` index (into the distinct images) of the image a replaced patch came from; ``-1``
            where the patch is the row's own.
    """

    patches: Tensor
    replaced: Tensor
    donor: Tensor


def swap_patches(
    patches: Tensor, target: Tensor, ratio: float, generator: torch.Generator | None = None
) -> SwappedPatches:
    """Replace ``⌊ratio·N + ½⌋`` patches of each row's image by patches of other images (see the module docstring).

    Args:
        patches: ``[M, N, D]`` patch features of the batch's distinct images.
        target: ``[B]`` index (into ``patches``) of each caption row's image (:func:`vgskit.losses.unique_images`).
        ratio: fraction of patches to replace (0.3 in the paper).
        generator: random source (default: torch's global generator on ``patches``' device).
    """
    m, n, _ = patches.shape
    b = target.shape[0]
    own = patches[target]  # [B, N, D]
    k = num_swapped(n, ratio)
    keep = torch.full((b, n), -1, dtype=torch.long, device=patches.device)
    if m < 2 or k == 0:  # no other image to take patches from, or nothing to replace
        return SwappedPatches(own, torch.zeros(b, n, dtype=torch.bool, device=patches.device), keep)
    # k positions per row, uniformly: the first k of a random permutation.
    order = torch.rand(b, n, generator=generator, device=patches.device).argsort(dim=1)  # [B, N]
    replaced = torch.zeros(b, n, dtype=torch.bool, device=patches.device)
    replaced.scatter_(1, order[:, :k], True)
    # A donor per patch, uniform over the M - 1 other images: own + offset (1..M-1), modulo M.
    offset = torch.randint(1, m, (b, n), generator=generator, device=patches.device)
    donor = (target[:, None] + offset) % m  # [B, N]
    positions = torch.arange(n, device=patches.device)
    taken = patches[donor, positions]  # [B, N, D]: donor's patch at the same position
    noisy = torch.where(replaced[..., None], taken, own)
    return SwappedPatches(noisy, replaced, torch.where(replaced, donor, keep))


# ---------------------------------------------------------------------------------------------------------
# Multi-positive contrastive loss
# ---------------------------------------------------------------------------------------------------------


def multi_positive_targets(image_ids: Tensor) -> Tensor:
    """``[N, N]`` targets: row ``i`` spreads probability ``1/n_i`` over the ``n_i`` rows of caption ``i``'s image."""
    same = (image_ids[:, None] == image_ids[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


class MultiPositiveInfoNCE(InfoNCELoss):
    """Symmetric contrastive loss with multi-positive targets (CMD §3.1, eq. 3–6).

    Rows are caption–image pairs (an image with several captions in the batch has several rows, as in the
    paper's ``B`` pairs). With scaled similarities ``ℓ = τ⁻¹ · S Iᵀ`` ``[N, N]`` and targets ``y`` (row ``i``:
    ``1/n_i`` on the rows of its image)::

        L = ½ [ mean_i H(y_i, softmax(ℓ[i, :])) + mean_i H(y_i, softmax(ℓ[:, i])) ]

    With one caption per image, ``y`` is the identity and this is the CLIP loss. The temperature and the
    distributed gather are :class:`~vgskit.losses.InfoNCELoss`'s (no clamp on the scale, as SpeechCLIP).
    """

    def __init__(self, init_temperature: float = 0.07, learnable_temperature: bool = True):
        super().__init__(init_temperature, learnable_temperature, max_logit_scale=None, dedup_images=False)

    def forward(self, speech: Tensor, image: Tensor, image_ids: Tensor | None = None) -> Tensor:
        """Loss of row-aligned ``speech [N, D]`` and ``image [N, D]`` (L2-normalised) with ``image_ids [N]``."""
        if image_ids is None:
            image_ids = torch.arange(speech.shape[0], device=speech.device)
        speech, image, image_ids = self._gather(speech, image, image_ids)
        with torch.autocast(speech.device.type, enabled=False):
            logits = self.scale() * speech.float() @ image.float().T  # [N, N]: speech i, image row j
            targets = multi_positive_targets(image_ids)  # symmetric
            s2i = -(targets * logits.log_softmax(dim=1)).sum(dim=1)  # [N]
            i2s = -(targets * logits.log_softmax(dim=0)).sum(dim=0)  # [N]: image row i over the speech
            return 0.5 * (s2i.mean() + i2s.mean())


# ---------------------------------------------------------------------------------------------------------
# Fusion encoder and patch projection (training only)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class FusionConfig:
    """The fusion encoder ``Ω``: attentive pooling → FC (width → width) → residual → LayerNorm.

    Attributes:
        project_qkv: learned ``D × D`` query/key/value maps in the attentive pooling; ``False`` (default):
            none (Table 1's parameter count, see the module docstring).
        layer_norm_eps: epsilon of the final LayerNorm.
    """

    project_qkv: bool = False
    layer_norm_eps: float = 1e-5


class FusionEncoder(nn.Module):
    """``F' = LN(FC(a) + a)`` with ``a = softmax(q Kᵀ / √D) V`` pooled over the noisy patches (eq. 1–2)."""

    def __init__(self, width: int, config: FusionConfig):
        super().__init__()
        self.width = width
        self.q = nn.Linear(width, width) if config.project_qkv else nn.Identity()
        self.k = nn.Linear(width, width) if config.project_qkv else nn.Identity()
        self.v = nn.Linear(width, width) if config.project_qkv else nn.Identity()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def attend(self, query: Tensor, patches: Tensor) -> Tensor:
        """Attentive pooling ``[B, D]`` of ``patches [B, N, D]`` with one query per row ``[B, D]`` (eq. 1)."""
        q, k, v = self.q(query), self.k(patches), self.v(patches)
        weights = torch.softmax(torch.einsum("bd,bnd->bn", q, k) / math.sqrt(self.width), dim=-1)  # [B, N]
        return torch.einsum("bn,bnd->bd", weights, v)

    def forward(self, query: Tensor, patches: Tensor) -> Tensor:
        """The reconstructed global image feature ``[B, D]`` (eq. 2; not normalised)."""
        pooled = self.attend(query, patches)
        return self.norm(self.fc(pooled) + pooled)


class PatchProjection(nn.Module):
    """Patch tokens → CLIP's joint space with CLIP's own final LayerNorm and visual projection.

    The two modules are the image tower's (shared, not copied): they follow the tower's device, and its
    weights when the tower is trained. For towers without a projection whose tokens already have the
    pooled width, the tokens are used as they are.
    """

    def __init__(self, image_tower: nn.Module, out_dim: int):
        super().__init__()
        model = getattr(image_tower, "model", None)
        vision = getattr(model, "vision_model", None)
        projection = getattr(model, "visual_projection", None)
        # CLIP: its final LayerNorm (applied to the CLS token before the projection) and the projection.
        self.norm: nn.Module = getattr(vision, "post_layernorm", None) or nn.Identity()
        self.proj: nn.Module = projection if projection is not None else nn.Identity()
        if projection is None and int(getattr(image_tower, "token_width", -1)) != out_dim:
            raise ConfigError(
                f"CMD needs the image tower's patch tokens in its pooled space ({out_dim} dims): a CLIP tower with "
                f"its visual projection, or a tower whose tokens have that width "
                f"(got {getattr(image_tower, 'token_width', '?')})"
            )

    def forward(self, tokens: Tensor) -> Tensor:
        """``[..., N, D_token]`` → ``[..., N, D]``."""
        return self.proj(self.norm(tokens))


# ---------------------------------------------------------------------------------------------------------
# Config and model
# ---------------------------------------------------------------------------------------------------------


def _cmd_speech() -> PretrainedSpeechConfig:
    return PretrainedSpeechConfig("hubert-large", freeze=True, normalize_waveform=True)


@dataclass
class CMDConfig(SpeechCLIPConfig):
    """Configuration of :class:`CrossModalDenoising`: a parallel :class:`SpeechCLIPConfig` plus the CMD task.

    Attributes (besides SpeechCLIP's; ``branches`` must be ``"parallel"``, ``text`` is not used):
        cmd_weight: ``α`` in ``L = L_sic + α · L_cmd`` (eq. 7); 0 trains parallel SpeechCLIP (with this
            config's targets) and skips the denoising computation.
        noise_ratio: fraction of each image's patches replaced by other images' patches (0.3, §3.1).
        positives: ``"multi"`` (§3.1: every caption of an image is a positive with probability ``1/n``) or
            ``"masked"`` (SpeechCLIP's loss: other captions of the image leave the denominators).
        fusion: the fusion encoder (:class:`FusionConfig`).
    """

    text: ClipTextConfig | None = None
    speech: PretrainedSpeechConfig = field(default_factory=_cmd_speech)
    cmd_weight: float = 1.0
    noise_ratio: float = 0.3
    positives: Literal["multi", "masked"] = "multi"
    fusion: FusionConfig = field(default_factory=FusionConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.fusion, Mapping):
            names = {f.name for f in fields(FusionConfig)}
            unknown = sorted(set(self.fusion) - names)
            if unknown:
                raise ConfigError(f"CMDConfig.fusion: unknown key(s) {unknown}; valid keys are {sorted(names)}")
            self.fusion = FusionConfig(**self.fusion)
        if not isinstance(self.fusion, FusionConfig):
            raise ConfigError(f"CMDConfig.fusion: expected a mapping, got {type(self.fusion).__name__}")
        if self.branches != "parallel":
            raise ConfigError(f"CMDConfig.branches: CMD is built on the parallel branch, got {self.branches!r}")
        if not self.cmd_weight >= 0:
            raise ConfigError(f"CMDConfig.cmd_weight must be >= 0, got {self.cmd_weight!r}")
        if not 0.0 <= self.noise_ratio <= 1.0:
            raise ConfigError(f"CMDConfig.noise_ratio must be in [0, 1], got {self.noise_ratio!r}")
        if self.positives not in POSITIVES:
            raise ConfigError(f"CMDConfig.positives must be one of {POSITIVES}, got {self.positives!r}")


def _drop_training_only(module: CrossModalDenoising, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # state_dict post-hook: the fusion encoder (and the patch projection, CLIP's) are not part of the model.
    heads = tuple(f"{prefix}{name}." for name in TRAINING_ONLY)
    for key in [k for k in state_dict if k.startswith(heads)]:
        del state_dict[key]


def _keep_training_only(module: CrossModalDenoising, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # load_state_dict pre-hook: a saved model has no training-only weights; the current ones stay.
    for name in TRAINING_ONLY:
        for key, value in nn.Module.state_dict(getattr(module, name)).items():
            state_dict.setdefault(f"{prefix}{name}.{key}", value)


class CrossModalDenoising(SpeechCLIP):
    """Parallel SpeechCLIP trained with cross-modal denoising (see the module docstring).

    :meth:`step` returns the losses ``sic`` (``L_sic``) and, when ``cmd_weight > 0``, ``cmd`` (``α · L_cmd``),
    and the metrics ``logit_scale``, ``temperature``, ``cmd_unweighted`` and ``swapped_fraction``.
    Retrieval is parallel SpeechCLIP's (``S_cls`` against ``I_cls``).

    Attributes (besides SpeechCLIP's):
        fusion: the fusion encoder ``Ω`` (training only; not in the state dict).
        patch_projection: patch tokens → joint space (CLIP's modules; not in the state dict).
    """

    config_class = CMDConfig

    def __init__(self, config: CMDConfig | None = None):
        config = copy.deepcopy(config) if config is not None else CMDConfig()
        if not isinstance(config, CMDConfig):
            raise ConfigError(f"CrossModalDenoising needs a CMDConfig, got {type(config).__name__}")
        super().__init__(config)
        self.config: CMDConfig = config
        if config.positives == "multi":
            self.loss = MultiPositiveInfoNCE(config.init_temperature, config.learnable_temperature)
        else:
            self.loss = speechclip_loss(config.learnable_temperature, config.init_temperature)
        self.patch_projection = PatchProjection(self.image_tower, self.embed_dim)
        self.fusion = FusionEncoder(self.embed_dim, config.fusion)
        post_hook = getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
        post_hook(_drop_training_only)
        if hasattr(self, "register_load_state_dict_pre_hook"):
            self.register_load_state_dict_pre_hook(_keep_training_only)
        else:  # torch < 2.1
            self._register_load_state_dict_pre_hook(_keep_training_only, with_module=True)

    def feature_cache_options(self) -> dict[str, dict[str, Any]]:
        """Speech: every hidden state; image: the patch tokens *and* the pooled embedding (CMD reads both)."""
        return {kind: {"pooled": False} for kind in self.frozen_towers()}

    def ddp_options(self) -> dict[str, Any]:
        # With α = 0 the fusion encoder takes no part in the loss.
        return {"find_unused_parameters": True} if self.config.cmd_weight == 0 else {}

    def step(self, batch: Batch, state: TrainState) -> StepOutput:
        """``sic`` = ``L_sic`` and ``cmd`` = ``α · L_cmd`` (eq. 5–7) for one batch."""
        assert self.parallel is not None
        wavs, lengths = self._speech_values(batch.speech)
        feats, frame_lengths = self.speech_features(wavs, lengths)  # [B, T', D]
        first, target = unique_images(batch.image_ids)  # [M], [B]
        pixels = self._image_values(batch.image.select(first))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.image.freeze):
            out = self.image_tower(pixels)
        image = F.normalize(out.pooled, dim=-1)[target]  # [B, P]: I_cls of each caption's image
        query = self.parallel(feats, frame_lengths)  # [B, P]: S_cls before normalisation
        speech = F.normalize(query, dim=-1)
        losses = {"sic": self.config.parallel_loss_weight * self.loss(speech, image, batch.image_ids)}
        scale = self.loss.scale().detach()
        metrics: dict[str, Tensor | float] = {"logit_scale": scale, "temperature": 1.0 / scale}
        if self.config.cmd_weight > 0:
            patches = self.patch_projection(out.tokens)  # [M, N, P]
            noisy = swap_patches(patches, target, self.config.noise_ratio)
            rebuilt = F.normalize(self.fusion(query, noisy.patches), dim=-1)  # [B, P]: F^I'
            cmd = self.loss(speech, rebuilt, batch.image_ids)
            losses["cmd"] = self.config.cmd_weight * cmd
            metrics["cmd_unweighted"] = cmd.detach()
            metrics["swapped_fraction"] = noisy.replaced.float().mean()
        return StepOutput(losses=losses, metrics=metrics)

    def speechclip_config(self) -> SpeechCLIPConfig:
        """The :class:`SpeechCLIPConfig` of the inference model (this config without the CMD fields)."""
        names = {f.name for f in fields(SpeechCLIPConfig)}
        values = {k: v for k, v in asdict(self.config).items() if k in names}
        return SpeechCLIPConfig(**values)

    def training_state(self) -> dict[str, Tensor]:
        """The fusion encoder's weights, kept by training checkpoints (the patch projection is CLIP's, frozen)."""
        return {f"fusion.{k}": v for k, v in self.fusion.state_dict().items()}

    def load_training_state(self, tensors: Mapping[str, Tensor]) -> None:
        """Restore :meth:`training_state` on resume (strict: every fusion tensor, nothing else)."""
        unknown = sorted(k for k in tensors if not k.startswith("fusion."))
        if unknown:
            raise KeyError(f"unexpected training-state tensors {unknown[:4]}")
        self.fusion.load_state_dict({k[len("fusion."):]: v for k, v in tensors.items()}, strict=True)

    def to_speechclip(self) -> SpeechCLIP:
        """A parallel :class:`SpeechCLIP` with this model's weights and no fusion encoder (same embeddings).

        Its loss is SpeechCLIP's (masked positives) with this model's temperature; its registry name is the
        parallel SpeechCLIP preset of the same size, so ``save_pretrained`` works on it.
        """
        model = SpeechCLIP(self.speechclip_config())
        model.load_state_dict(self.state_dict(), strict=True)
        large = self.config.speech.name_or_path == speechclip_preset("large", "parallel").speech.name_or_path
        model.model_name = f"speechclip_parallel_{'large' if large else 'base'}"
        return model.train(self.training)


def cmd_preset() -> CMDConfig:
    """The paper's model (§3.1, Table 1): parallel SpeechCLIP large (HuBERT-Large + CLIP ViT-L/14) + CMD."""
    parallel = speechclip_preset("large", "parallel")
    values = {f.name: getattr(parallel, f.name) for f in fields(SpeechCLIPConfig)}
    values["text"] = None  # CMD never reads CLIP's text tower
    return CMDConfig(**values)


register_model("cmd_large", config=cmd_preset())(CrossModalDenoising)


__all__ = [
    "POSITIVES",
    "TRAINING_ONLY",
    "CMDConfig",
    "CrossModalDenoising",
    "FusionConfig",
    "FusionEncoder",
    "MultiPositiveInfoNCE",
    "PatchProjection",
    "SwappedPatches",
    "cmd_preset",
    "multi_positive_targets",
    "num_swapped",
    "swap_patches",
]
