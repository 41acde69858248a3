"""SpeechCLIP (Shih et al., SLT 2022): the model family package.

* :mod:`~vgskit.models.speechclip.model` — :class:`SpeechCLIP`, its config and the registered sizes
  (``speechclip_{parallel,cascaded}_{base,large}``);
* :mod:`~vgskit.models.speechclip.blocks` — the branches, quantiser, loss and key conversion, checked
  against the reference implementation;
* :mod:`~vgskit.models.speechclip.convert` — released reference checkpoints → vgskit models;
* :mod:`~vgskit.models.speechclip.metrics` — the keyword hit rate of the cascaded branch;
* :mod:`~vgskit.models.speechclip.evaluations` — the ``zero_shot_text`` and ``keyword_hit_rate``
  evaluations (``vgskit eval --zero-shot-text / --keyword-hit-rate``);
* :mod:`~vgskit.models.speechclip.cmd` — Cross-Modal Denoising (Zhou et al., Interspeech 2024): parallel
  SpeechCLIP trained with a training-only denoising task (``cmd_large``);
* :mod:`~vgskit.models.speechclip.commands` — ``vgskit keywords``, ``vgskit layers`` and
  ``vgskit convert speechclip``.

Importing the package registers the models, the evaluations, the commands and the converter; the generic
parts of vgskit find them through :mod:`vgskit.models.registry` and :mod:`vgskit.extensions` only.
"""

from vgskit.models.speechclip import commands  # noqa: F401  (registers the commands and the converter)
from vgskit.models.speechclip.analyses import (
    AttentionPlot,
    ShuffledCaptionBatches,
    keyword_slot_top_subwords,
    plot_keyword_attention,
)
from vgskit.models.speechclip.blocks import (
    REFERENCE_LOSS_BUFFERS,
    AttentionAndNorm,
    CascadedBranch,
    CascadedBranchConfig,
    CascadedBranchOutput,
    CosineVectorQuantizer,
    KeywordBatchNorm,
    KeywordProjection,
    ParallelBranch,
    ParallelBranchConfig,
    QuantizerOutput,
    SpeechClipWarmupDecay,
    convert_speechclip_state_dict,
    cosine_scores,
    encode_keywords,
    key_padding_mask,
    speechclip_loss,
)
from vgskit.models.speechclip.cmd import (
    CMDConfig,
    CrossModalDenoising,
    FusionConfig,
    FusionEncoder,
    MultiPositiveInfoNCE,
    swap_patches,
)
from vgskit.models.speechclip.convert import (
    REFERENCE_TABLE_KEYS,
    REFERENCE_TOWER_PREFIXES,
    ReferenceConversion,
    UnpickledObject,
    convert_reference_checkpoint,
    load_reference_checkpoint,
    match_token_rows,
    read_reference_checkpoint,
)
from vgskit.models.speechclip.evaluations import (  # registers the evaluations
    KEYWORD_SOURCES,
    caption_texts,
    evaluate_keyword_hit_rate,
    evaluate_zero_shot_text,
    format_keyword_hit_rate,
    format_zero_shot_text,
    keyword_transcripts,
    require_keyword_branch,
    require_text_tower,
)
from vgskit.models.speechclip.metrics import keyword_hit_rate
from vgskit.models.speechclip.model import (
    BRANCHES,
    CLIP_PAD_ID,
    VOCAB_CAPTION_SPLITS,
    KeywordAttention,
    KeywordVocabulary,
    RawLastStateSpeechEncoder,
    SpeechCLIP,
    SpeechCLIPConfig,
    build_keyword_vocabulary,
    clip_sot_eot_ids,
    keyword_vocab_texts,
    special_token_ids,
    speechclip_preset,
)

__all__ = [
    "BRANCHES",
    "CLIP_PAD_ID",
    "CMDConfig",
    "KEYWORD_SOURCES",
    "REFERENCE_LOSS_BUFFERS",
    "REFERENCE_TABLE_KEYS",
    "REFERENCE_TOWER_PREFIXES",
    "VOCAB_CAPTION_SPLITS",
    "AttentionAndNorm",
    "AttentionPlot",
    "CascadedBranch",
    "CascadedBranchConfig",
    "CascadedBranchOutput",
    "CosineVectorQuantizer",
    "CrossModalDenoising",
    "FusionConfig",
    "FusionEncoder",
    "KeywordAttention",
    "KeywordBatchNorm",
    "KeywordProjection",
    "KeywordVocabulary",
    "MultiPositiveInfoNCE",
    "ParallelBranch",
    "ParallelBranchConfig",
    "QuantizerOutput",
    "RawLastStateSpeechEncoder",
    "ReferenceConversion",
    "SpeechCLIP",
    "ShuffledCaptionBatches",
    "SpeechCLIPConfig",
    "SpeechClipWarmupDecay",
    "UnpickledObject",
    "build_keyword_vocabulary",
    "caption_texts",
    "clip_sot_eot_ids",
    "convert_reference_checkpoint",
    "convert_speechclip_state_dict",
    "cosine_scores",
    "encode_keywords",
    "evaluate_keyword_hit_rate",
    "evaluate_zero_shot_text",
    "format_keyword_hit_rate",
    "format_zero_shot_text",
    "key_padding_mask",
    "keyword_hit_rate",
    "keyword_slot_top_subwords",
    "keyword_transcripts",
    "keyword_vocab_texts",
    "load_reference_checkpoint",
    "match_token_rows",
    "plot_keyword_attention",
    "read_reference_checkpoint",
    "require_keyword_branch",
    "require_text_tower",
    "special_token_ids",
    "speechclip_loss",
    "speechclip_preset",
    "swap_patches",
]
