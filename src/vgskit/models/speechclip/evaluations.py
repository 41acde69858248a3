"""SpeechCLIP's own evaluations, registered with :func:`vgskit.extensions.register_evaluation`.

* ``zero_shot_text`` — zero-shot speech <-> caption-text retrieval through CLIP's text tower
  (:func:`evaluate_zero_shot_text`; ``vgskit eval --zero-shot-text``). Any model with ``encode_text`` into its
  speech space qualifies; speech and text never met in training, only through the image space.
* ``keyword_hit_rate`` — how often a keyword slot of the cascaded branch picks a subword of the caption
  (:func:`evaluate_keyword_hit_rate`; ``vgskit eval --keyword-hit-rate [--keyword-top-k N]``).

Both are requested by name from :func:`vgskit.retrieval.evaluate.evaluate` (``extras=[...]``), which checks
the model and the transcripts before the long embedding pass and hands over the coarse speech embeddings it
computed; the functions below also run on their own.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vgskit.contract import SpeechInputs
from vgskit.errors import ConfigError, VGSKitError
from vgskit.extensions import register_evaluation

__all__ = [
    "KEYWORD_SOURCES",
    "TOP_SUBWORDS",
    "caption_texts",
    "evaluate_keyword_hit_rate",
    "evaluate_zero_shot_text",
    "format_keyword_hit_rate",
    "format_zero_shot_text",
    "keyword_transcripts",
    "require_keyword_branch",
    "require_text_tower",
]

#: What :func:`evaluate_keyword_hit_rate` looks up in the vocabulary for each keyword slot.
KEYWORD_SOURCES = ("chosen", "slot")
#: Subwords per slot that :func:`evaluate_keyword_hit_rate` lists as the slot's most frequent selections.
TOP_SUBWORDS = 10


def _model_name(model: nn.Module) -> str:
    return str(getattr(model, "model_name", None) or type(model).__name__)


def _transcripts(dataset: Any, source: str | None, purpose: str) -> list[str]:
    # Every caption needs its text; the error lists the first captions without one so the data can be fixed.
    missing = [r.caption_id for r in dataset.records if not r.text]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        where = f"{source}: " if source else ""
        raise VGSKitError(f"{where}{len(missing)} of {len(dataset.records)} captions have no transcript (text) "
                          f"({shown}); {purpose}")
    return [str(r.text) for r in dataset.records]


def _check_options(name: str, options: Mapping[str, Any], known: Sequence[str]) -> None:
    # A misspelt option would otherwise be ignored and the default silently used.
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"evaluation {name!r}: unknown option(s) {unknown}; valid options are {sorted(known)}")


# ---------------------------------------------------------------------------------------------------------
# Zero-shot speech <-> text retrieval
# ---------------------------------------------------------------------------------------------------------


def require_text_tower(model: nn.Module) -> None:
    """Raise unless ``model`` embeds text (``encode_text``), which zero-shot speech <-> text retrieval needs."""
    if not callable(getattr(model, "encode_text", None)):
        raise VGSKitError(f"model {_model_name(model)!r} has no text tower (encode_text): zero-shot speech <-> text "
                          "retrieval needs a model that embeds text in its speech space, such as SpeechCLIP")


def caption_texts(dataset: Any, source: str | None = None) -> list[str]:
    """The transcript of every caption of ``dataset``; an error listing captions without one.

    ``source`` (e.g. the manifest and split) is named in the error.
    """
    return _transcripts(dataset, source, "zero-shot speech <-> text retrieval ranks the caption texts")


@torch.no_grad()
def evaluate_zero_shot_text(model: nn.Module, dataset: Any, *, batch_size: int = 128, ks: Sequence[int] = (1, 5, 10),
                            chunk_size: int = 1024, speech_emb: Tensor | None = None,
                            source: str | None = None) -> dict[str, Any]:
    """Zero-shot speech <-> text retrieval of ``dataset``'s captions, scored as the SpeechCLIP paper does.

    Speech queries rank the caption texts (embedded with ``model.encode_text``) and hit when a retrieved
    text is a caption of the same image; text queries rank the spoken captions the same way (see
    :func:`vgskit.metrics.speech_text_retrieval`). No speech-text pair was seen in training: the two meet
    only through the image space.

    Args:
        model: a model with ``encode_text`` (see :func:`require_text_tower`).
        dataset: a :class:`~vgskit.data.loader.SpokenCaptionDataset` whose captions all have transcripts.
        batch_size: captions (speech or text) per embedding batch.
        ks: recall cut-offs.
        chunk_size: queries per similarity block.
        speech_emb: ``[Nc, D]`` coarse speech embeddings already computed (dataset order), reused instead
            of a second pass over the audio.
        source: the data's name in errors (e.g. the manifest and split).
    """
    from vgskit.metrics import speech_text_retrieval
    from vgskit.retrieval.evaluate import embed_speech

    require_text_tower(model)
    texts = caption_texts(dataset, source)
    if speech_emb is None:
        speech_emb = embed_speech(model, dataset, batch_size).pooled  # [Nc, D]
    was_training = model.training
    model.eval()
    try:
        text_emb = torch.cat([model.encode_text(texts[i:i + batch_size]).float()  # type: ignore[operator]
                              for i in range(0, len(texts), batch_size)])  # [Nc, D]
    finally:
        model.train(was_training)
    labels = torch.tensor(dataset.caption_image_index, dtype=torch.long)  # [Nc]
    return speech_text_retrieval(speech_emb.float().cpu(), text_emb.cpu(), labels, labels, ks=ks,
                                 chunk_size=chunk_size)


def format_zero_shot_text(result: Mapping[str, Any]) -> str:
    """The ``vgskit eval`` table of :func:`evaluate_zero_shot_text`'s result, with its gallery size."""
    from vgskit.metrics import format_recall_table

    ks = sorted(int(key[2:]) for key in result["speech_to_text"] if key.startswith("R@"))
    n_texts = result["text_to_speech"]["n_queries"]
    return (f"zero-shot speech <-> text (gallery: {n_texts} caption texts; a hit is a caption of the same image)\n"
            f"{format_recall_table(result, ks=ks)}")


def _require_caption_texts(dataset: Any, source: str) -> None:
    caption_texts(dataset, source)


@register_evaluation(
    "zero_shot_text",
    require_model=require_text_tower,
    require_data=_require_caption_texts,
    format=format_zero_shot_text,
    options={"ks": (1, 5, 10), "chunk_size": 1024},
    help="also rank the caption texts with speech and the speech with texts (models with a text tower, e.g. "
         "SpeechCLIP; every caption needs a transcript)",
)
def zero_shot_text_evaluation(model: nn.Module, dataset: Any, *, batch_size: int, source: str,
                              options: Mapping[str, Any], speech_emb: Tensor) -> dict[str, Any]:
    """The registered form of :func:`evaluate_zero_shot_text`, reusing the recall pass's speech embeddings."""
    _check_options("zero_shot_text", options, ("ks", "chunk_size"))
    return evaluate_zero_shot_text(model, dataset, batch_size=batch_size, ks=tuple(options["ks"]),
                                   chunk_size=int(options["chunk_size"]), speech_emb=speech_emb, source=source)


# ---------------------------------------------------------------------------------------------------------
# Keyword hit rate (cascaded branch)
# ---------------------------------------------------------------------------------------------------------


def require_keyword_branch(model: nn.Module) -> tuple[Tensor, Tensor, Any]:
    """``(table [V, D], token_ids [V], tokenizer)`` of a model with keyword slots; a clear error otherwise.

    The keyword hit rate needs the vocabulary the keywords are chosen from (``keyword_table()``,
    ``keyword_token_ids``) and the text tower's tokenizer, to split each transcript into the same subwords.
    """
    name = _model_name(model)
    # Looked up on the class: a model without the cascaded branch raises from the property itself.
    if not all(hasattr(type(model), a) for a in ("keyword_table", "keyword_token_ids", "keyword_ids")):
        raise VGSKitError(f"model {name!r} has no keyword slots (keyword_table, keyword_token_ids, keyword_ids): "
                          "the keyword hit rate needs a cascaded model such as SpeechCLIP-C")
    try:
        table = model.keyword_table()  # type: ignore[operator]
        ids = model.keyword_token_ids
    except VGSKitError as err:  # e.g. a SpeechCLIP without its cascaded branch
        raise VGSKitError(f"model {name!r}: the keyword hit rate needs the cascaded branch ({err})") from err
    tokenizer = getattr(getattr(model, "text_tower", None), "tokenizer", None)
    if tokenizer is None:
        raise VGSKitError(f"model {name!r}: its text tower has no tokenizer files (vocab.json, merges.txt), "
                          "which the keyword hit rate needs to split the transcripts into subwords")
    return table.detach(), ids.detach().long(), tokenizer  # type: ignore[union-attr]


def keyword_transcripts(dataset: Any, source: str | None = None) -> list[str]:
    """The transcript of every caption of ``dataset``; an error naming ``source`` and captions without one."""
    return _transcripts(dataset, source, "the keyword hit rate compares each caption's keywords with the "
                                         "subwords of its transcript")


@torch.no_grad()
def evaluate_keyword_hit_rate(model: nn.Module, dataset: Any, *, top_k: int = 5,
                              keywords: Literal["chosen", "slot"] = "chosen", batch_size: int = 64,
                              source: str | None = None) -> dict[str, Any]:
    """Per-slot keyword hit rate of a cascaded model (SpeechCLIP-C) over ``dataset``'s captions, in percent.

    For every caption and keyword slot, the ``top_k`` vocabulary entries nearest (by cosine) to the slot's
    keyword are looked up; the slot *hits* when any of them is one of the subwords of the caption's own
    transcript (:func:`vgskit.models.speechclip.metrics.keyword_hit_rate`). ``keywords`` says which vector is
    looked up:

    * ``"chosen"`` (default): the vocabulary entry the slot selects, i.e. the token embedding CLIP's text
      tower receives. The reference implementation scores these (with 5 neighbours); with ``top_k=1`` this
      is the paper's definition (the selected subword itself occurs in the caption).
    * ``"slot"``: the slot's batch-normalised vector before it is quantised (``keyword_embeddings``).

    Two details differ from the reference code on purpose: padding/start/end-of-text rows are never counted
    among the neighbours (a keyword can never be one of them), and a transcript's subwords are its own
    tokens only (the reference re-encodes padded token sequences, so start/end-of-text neighbours count as
    hits there). Captions are embedded in length order to keep padding small; the model runs in eval mode
    (the keyword BatchNorm uses its running statistics).

    The result also lists, per slot, the :data:`TOP_SUBWORDS` subwords the slot selects most often over the
    captions, with their counts (the paper's Table 5; :func:`~vgskit.models.speechclip.analyses.keyword_slot_top_subwords`).

    Returns:
        ``{"per_slot": [K rates], "mean": ..., "top_k": ..., "keywords": ..., "n_captions": N,
        "top_subwords": [K lists of [subword, count]]}``.

    Raises:
        VGSKitError: the model has no cascaded branch or no tokenizer, or a caption has no transcript
            (``source``, e.g. the manifest and split, is named in the message).
    """
    from vgskit.models.speechclip.analyses import keyword_slot_top_subwords
    from vgskit.models.speechclip.metrics import keyword_hit_rate
    from vgskit.models.speechclip.model import special_token_ids
    from vgskit.retrieval.evaluate import map_speech

    if keywords not in KEYWORD_SOURCES:
        raise ConfigError(f"keywords: must be one of {KEYWORD_SOURCES}, got {keywords!r}")
    table, token_ids, tokenizer = require_keyword_branch(model)
    table, token_ids = table.float().cpu(), token_ids.cpu()  # [V, D], [V]
    texts = keyword_transcripts(dataset, source)
    # Candidates: every vocabulary row except padding and start/end of text (never chosen as keywords).
    special = torch.tensor(sorted(special_token_ids(tokenizer)), dtype=torch.long)
    keep = ~torch.isin(token_ids, special)
    candidates, candidate_ids = table[keep], token_ids[keep]  # [V', D], [V']
    if not 1 <= top_k <= len(candidate_ids):
        raise ConfigError(f"top_k: must be in [1, {len(candidate_ids)}] (the keyword vocabulary without special "
                          f"tokens), got {top_k}")
    row_of = {int(t): r for r, t in enumerate(token_ids.tolist())}
    caption_tokens = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def slot_vectors(speech: SpeechInputs) -> list[tuple[Tensor, list[int]]]:
        wavs, lengths = speech.values, speech.lengths  # [B, T], [B]
        chosen, _ = model.keyword_ids(wavs, lengths, top_k=1)  # type: ignore[operator]  # [B, K, 1] token ids
        chosen_ids = [[int(t) for t in slots] for slots in chosen[..., 0].tolist()]  # [B][K]
        if keywords == "chosen":
            vectors = table[torch.tensor([[row_of[t] for t in slots] for slots in chosen_ids])]  # [B, K, D]
        else:
            vectors = model.keyword_embeddings(wavs, lengths).float().cpu()  # type: ignore[operator]  # [B, K, D]
        return list(zip(vectors, chosen_ids, strict=True))

    rows = map_speech(model, dataset, slot_vectors, batch_size)
    vectors = torch.stack([v for v, _ in rows])  # [N, K, D]
    rates = keyword_hit_rate(vectors, candidates, caption_tokens, candidate_ids, top=top_k)
    top_subwords = keyword_slot_top_subwords([ids for _, ids in rows], TOP_SUBWORDS,
                                             decode=lambda t: tokenizer.convert_ids_to_tokens(int(t)))
    return {"per_slot": [float(r) for r in rates], "mean": float(rates.mean()), "top_k": int(top_k),
            "keywords": keywords, "n_captions": len(dataset),
            "top_subwords": [[[str(tok), int(n)] for tok, n in slot] for slot in top_subwords]}


def format_keyword_hit_rate(result: Mapping[str, Any]) -> str:
    """A small text table of :func:`evaluate_keyword_hit_rate`'s result (one line per slot, then the mean)."""
    what = "selected subword" if result["keywords"] == "chosen" else "slot vector"
    lines = [f"keyword hit rate (top-{result['top_k']} vocabulary neighbours of each slot's {what} among the "
             f"caption's subwords; {result['n_captions']} captions)"]
    lines += [f"  slot {i:>2}: {rate:6.2f} %" for i, rate in enumerate(result["per_slot"], start=1)]
    lines.append(f"  mean   : {result['mean']:6.2f} %")
    top = result.get("top_subwords")
    if top:
        lines.append("most frequent selected subwords per slot (count)")
        lines += [f"  slot {i:>2}: " + ", ".join(f"{tok} ({n})" for tok, n in slot)
                  for i, slot in enumerate(top, start=1)]
    return "\n".join(lines)


def _require_keyword_branch(model: nn.Module) -> None:
    require_keyword_branch(model)


def _require_keyword_transcripts(dataset: Any, source: str) -> None:
    keyword_transcripts(dataset, source)


def _add_keyword_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keyword-hit-rate", action="store_true",
                        help="also report the per-slot keyword hit rate (cascaded models, e.g. SpeechCLIP-C; every "
                             "caption needs a transcript)")
    parser.add_argument("--keyword-top-k", type=int, default=5,
                        help="vocabulary neighbours of each keyword that count for the hit rate (default 5)")


def _keyword_options(args: argparse.Namespace) -> dict[str, Any] | None:
    # Checked even when the hit rate is not requested: a bad value on the command line is a mistake either way.
    top_k = int(getattr(args, "keyword_top_k", 5))
    if top_k < 1:
        raise VGSKitError(f"--keyword-top-k must be >= 1, got {top_k}")
    return {"top_k": top_k} if getattr(args, "keyword_hit_rate", False) else None


@register_evaluation(
    "keyword_hit_rate",
    require_model=_require_keyword_branch,
    require_data=_require_keyword_transcripts,
    format=format_keyword_hit_rate,
    options={"top_k": 5, "keywords": "chosen"},
    add_arguments=_add_keyword_arguments,
    from_args=_keyword_options,
    help="per-slot keyword hit rate (cascaded SpeechCLIP; every caption needs a transcript)",
)
def keyword_hit_rate_evaluation(model: nn.Module, dataset: Any, *, batch_size: int, source: str,
                                options: Mapping[str, Any], speech_emb: Tensor) -> dict[str, Any]:
    """The registered form of :func:`evaluate_keyword_hit_rate` (options ``top_k`` and ``keywords``)."""
    _check_options("keyword_hit_rate", options, ("top_k", "keywords"))
    return evaluate_keyword_hit_rate(model, dataset, top_k=int(options["top_k"]), keywords=options["keywords"],
                                     batch_size=batch_size, source=source)
