"""The typed values that travel between a model, the trainer, the evaluator and the search engine.

Nothing here knows any model family. The generic rooms (``vgskit.train``, ``vgskit.retrieval``,
``vgskit.data``) exchange only these types with a :class:`~vgskit.models.base.RetrievalModel`:

* :class:`SpeechInputs` / :class:`ImageInputs` — what a model declares it reads, each under its own name
  and unit: waveforms in *samples*, frame features and cached tower states in *frames*, images as pixels,
  region features with boxes, or cached tower outputs;
* :class:`Batch` — one training batch: speech and image inputs aligned row by row, the image id of every
  row (rows of one image share it), the caption index, and extra manifest fields;
* :class:`TrainState` — where training stands when a step runs (step, epoch, fraction of the run), so that
  a model can schedule its own loss weights or momentum;
* :class:`Embeddings` — what ``embed_speech``/``embed_image`` return: a pooled vector per row for coarse
  search, plus optional token-level tensors and their mask for a fine (cross-modal) scorer;
* :class:`StepOutput` — named, already-weighted losses (the trainer sums them) and metrics to log.

Shapes are noted as ``[B, ...]``; ``B`` is the batch (or gallery) size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from vgskit.errors import ConfigError

#: Speech input kinds. ``waveform``: mono float samples ``[B, T]``; ``features``: frame features ``[B, T, F]``
#: (e.g. filterbanks computed elsewhere); ``tower_states``: cached outputs of a frozen speech tower,
#: ``[B, L, T, D]`` per layer (or pooled ``[B, L, D]``); ``text``: the captions' transcripts instead of their
#: audio (text towers, the ground-truth-text topline of a speech → ASR → text cascade), UTF-8 bytes ``[B, L]``
#: (uint8, zero-padded) — bytes rather than strings so that padding, row selection, device moves and the
#: per-process slicing of a batch treat them like any other tensor.
SpeechKind = Literal["waveform", "features", "tower_states", "text"]
SPEECH_KINDS: tuple[str, ...] = ("waveform", "features", "tower_states", "text")
#: Image input kinds. ``pixels``: normalised images ``[B, 3, S, S]``; ``regions``: detector region features
#: ``[B, N, F]`` with normalised boxes ``[B, N, 4]`` and a validity mask ``[B, N]``; ``tower_outputs``: cached
#: outputs of a frozen image tower, one flat vector per image ``[B, K]``.
ImageKind = Literal["pixels", "regions", "tower_outputs"]
IMAGE_KINDS: tuple[str, ...] = ("pixels", "regions", "tower_outputs")


def _move(value: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=non_blocking)
    if hasattr(value, "to_device"):
        return value.to_device(device, non_blocking)
    if isinstance(value, Mapping):
        return {k: _move(v, device, non_blocking) for k, v in value.items()}
    return value


class _Moveable:
    """``to_device`` for dataclasses of tensors (nested ones included)."""

    def to_device(self, device: torch.device | str, non_blocking: bool = False) -> Any:
        return replace(self, **{f.name: _move(getattr(self, f.name), device, non_blocking)  # type: ignore[misc]
                                for f in fields(self) if f.init})  # type: ignore[arg-type]


@dataclass
class SpeechInputs(_Moveable):
    """A padded batch of speech inputs of one kind.

    Attributes:
        kind: see :data:`SPEECH_KINDS`.
        values: ``[B, T]`` samples (``waveform``), ``[B, T, F]`` frames (``features``) or
            ``[B, L, T, D]`` / pooled ``[B, L, D]`` (``tower_states``).
        lengths: ``[B]`` valid length of each row, in :attr:`unit` (samples for waveforms, frames otherwise).
        rate: samples per second (``waveform``) or frames per second (the other kinds).
    """

    kind: SpeechKind
    values: Tensor
    lengths: Tensor
    rate: float = 16000.0

    def __post_init__(self) -> None:
        if self.kind not in SPEECH_KINDS:
            raise ConfigError(f"SpeechInputs.kind: must be one of {SPEECH_KINDS}, got {self.kind!r}")
        want = {"waveform": (2,), "features": (3,), "tower_states": (3, 4), "text": (2,)}[self.kind]
        if self.values.dim() not in want:
            raise ConfigError(f"SpeechInputs({self.kind}): values must have {' or '.join(map(str, want))} "
                              f"dimensions, got shape {tuple(self.values.shape)}")
        if self.lengths.dim() != 1 or self.lengths.shape[0] != self.values.shape[0]:
            raise ConfigError(f"SpeechInputs({self.kind}): lengths must be [B={self.values.shape[0]}], got "
                              f"{tuple(self.lengths.shape)}")

    @property
    def unit(self) -> str:
        """``"samples"``, ``"bytes"`` (text) or ``"frames"``: the unit of :attr:`lengths`."""
        return {"waveform": "samples", "text": "bytes"}.get(self.kind, "frames")

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def select(self, rows: Tensor | Sequence[int]) -> SpeechInputs:
        """The rows ``rows`` (padding beyond their longest length is kept: harmless, masked by lengths)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.values.device)
        return replace(self, values=self.values[rows], lengths=self.lengths[rows.to(self.lengths.device)])

    @classmethod
    def waveform(cls, wavs: Tensor, lengths: Tensor, sample_rate: float = 16000.0) -> SpeechInputs:
        """Waveforms ``[B, T]`` with ``lengths [B]`` in samples."""
        return cls("waveform", wavs, lengths, float(sample_rate))

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> SpeechInputs:
        """Transcripts as a ``text`` batch: UTF-8 bytes ``[B, L]`` (uint8, zero-padded), ``lengths [B]`` in bytes."""
        encoded = [str(t).encode("utf-8") for t in texts]
        values = torch.zeros(len(encoded), max([len(e) for e in encoded] + [1]), dtype=torch.uint8)
        for row, e in enumerate(encoded):
            if e:
                values[row, : len(e)] = torch.frombuffer(bytearray(e), dtype=torch.uint8)
        return cls("text", values, torch.tensor([len(e) for e in encoded], dtype=torch.long), 0.0)

    def texts(self) -> list[str]:
        """The transcripts of a ``text`` batch (the inverse of :meth:`from_texts`)."""
        if self.kind != "text":
            raise ConfigError(f"SpeechInputs.texts: a {self.kind} batch holds no text")
        data = self.values.to("cpu", torch.uint8)
        return [bytes(data[row, : int(n)].tolist()).decode("utf-8") for row, n in enumerate(self.lengths.tolist())]


@dataclass
class ImageInputs(_Moveable):
    """A batch of image inputs of one kind (see :data:`IMAGE_KINDS`); unused fields stay ``None``.

    Attributes:
        kind: ``pixels``, ``regions`` or ``tower_outputs``.
        pixels: ``[B, 3, S, S]`` normalised as the model's ``image_transform`` says.
        regions: ``[B, N, F]`` region features, best-scoring first; ``boxes [B, N, 4]`` ``x1, y1, x2, y2``
            normalised by the image size; ``region_mask [B, N]`` True for real regions (an image with fewer
            detections is padded with zeros).
        tower_outputs: ``[B, K]`` cached frozen-tower outputs of each image, flattened.
    """

    kind: ImageKind
    pixels: Tensor | None = None
    regions: Tensor | None = None
    boxes: Tensor | None = None
    region_mask: Tensor | None = None
    tower_outputs: Tensor | None = None

    _REQUIRED: ClassVar[dict[str, tuple[str, ...]]] = {
        "pixels": ("pixels",), "regions": ("regions", "boxes", "region_mask"), "tower_outputs": ("tower_outputs",)}

    def __post_init__(self) -> None:
        if self.kind not in IMAGE_KINDS:
            raise ConfigError(f"ImageInputs.kind: must be one of {IMAGE_KINDS}, got {self.kind!r}")
        missing = [n for n in self._REQUIRED[self.kind] if getattr(self, n) is None]
        if missing:
            raise ConfigError(f"ImageInputs({self.kind}): missing {', '.join(missing)}")

    @property
    def main(self) -> Tensor:
        """The tensor that defines the batch size."""
        return getattr(self, self._REQUIRED[self.kind][0])

    def __len__(self) -> int:
        return int(self.main.shape[0])

    def select(self, rows: Tensor | Sequence[int]) -> ImageInputs:
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.main.device)
        return replace(self, **{n: getattr(self, n)[rows] for n in
                                ("pixels", "regions", "boxes", "region_mask", "tower_outputs")
                                if getattr(self, n) is not None})

    @classmethod
    def from_pixels(cls, pixels: Tensor) -> ImageInputs:
        return cls("pixels", pixels=pixels)

    @classmethod
    def cat(cls, parts: Sequence[ImageInputs]) -> ImageInputs:
        """Concatenate batches of one kind along the batch dimension."""
        if not parts:
            raise ConfigError("ImageInputs.cat: nothing to concatenate")
        kind = parts[0].kind
        if any(p.kind != kind for p in parts):
            raise ConfigError("ImageInputs.cat: batches of different kinds")
        return cls(kind, **{n: torch.cat([getattr(p, n) for p in parts]) for n in
                            ("pixels", "regions", "boxes", "region_mask", "tower_outputs")
                            if getattr(parts[0], n) is not None})


@dataclass
class Batch(_Moveable):
    """One (per-process) training batch.

    Attributes:
        speech: the captions' speech inputs ``[B, ...]``.
        image: the image of every caption, row-aligned with ``speech`` ``[B, ...]`` (a batch holds several
            captions of an image, so image rows repeat; :func:`vgskit.losses.unique_images` finds the
            distinct ones).
        image_ids: ``[B]`` int64; rows of one image share an id (same-image negatives are masked by losses).
        caption_ids: ``[B]`` int64 dataset index of each caption.
        extras: other manifest fields the dataset was asked to carry (word alignments, transcripts, ...),
            one list entry per row.
    """

    speech: SpeechInputs
    image: ImageInputs
    image_ids: Tensor
    caption_ids: Tensor
    extras: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.speech)

    def select(self, rows: Tensor | Sequence[int]) -> Batch:
        """The rows ``rows`` of every part (speech, image, ids, and each per-row list of ``extras``)."""
        index = torch.as_tensor(rows, dtype=torch.long).cpu()
        picked = index.tolist()
        return Batch(
            speech=self.speech.select(index),
            image=self.image.select(index),
            image_ids=self.image_ids[index.to(self.image_ids.device)],
            caption_ids=self.caption_ids[index.to(self.caption_ids.device)],
            extras={name: [values[i] for i in picked] for name, values in self.extras.items()},
        )


@dataclass(frozen=True)
class TrainState:
    """Where training stands when a step runs (or, for ``after_step``, right after it).

    Attributes:
        step: optimizer updates completed before this one (0 for the first step; ``after_step`` sees the
            count including the step just taken).
        epoch: 0-based epoch of the batch.
        epoch_float: ``epoch`` + the fraction of the epoch's batches completed.
        total_steps: updates the run will make in all.
    """

    step: int = 0
    epoch: int = 0
    epoch_float: float = 0.0
    total_steps: int = 1

    @property
    def fraction(self) -> float:
        """``step / total_steps``, clipped to [0, 1] (momentum and loss-weight schedules read this)."""
        return min(max(self.step / max(self.total_steps, 1), 0.0), 1.0)


@dataclass
class Embeddings(_Moveable):
    """What a model's ``embed_speech``/``embed_image`` return for a batch.

    Attributes:
        pooled: ``[B, D]`` one vector per row for coarse search (dot products; whether they are unit vectors
            is the model's choice).
        tokens: optional ``[B, T, D']`` token-level features a fine scorer (``score_pairs``) needs.
        mask: ``[B, T]`` True for valid tokens (required with ``tokens``).
    """

    pooled: Tensor
    tokens: Tensor | None = None
    mask: Tensor | None = None

    def __post_init__(self) -> None:
        if self.pooled.dim() != 2:
            raise ConfigError(f"Embeddings.pooled must be [B, D], got shape {tuple(self.pooled.shape)}")
        if self.tokens is not None:
            if self.mask is None:
                self.mask = torch.ones(self.tokens.shape[:2], dtype=torch.bool, device=self.tokens.device)
            if self.tokens.dim() != 3 or self.tokens.shape[0] != self.pooled.shape[0]:
                raise ConfigError(f"Embeddings.tokens must be [B={self.pooled.shape[0]}, T, D], got "
                                  f"{tuple(self.tokens.shape)}")
            if tuple(self.mask.shape) != tuple(self.tokens.shape[:2]):
                raise ConfigError(f"Embeddings.mask must be {tuple(self.tokens.shape[:2])}, got "
                                  f"{tuple(self.mask.shape)}")

    def __len__(self) -> int:
        return int(self.pooled.shape[0])

    def select(self, rows: Tensor | Sequence[int]) -> Embeddings:
        """Rows ``rows`` (any order, repeats allowed), e.g. the candidates of a re-ranking batch."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.pooled.device)
        if self.tokens is None:
            return Embeddings(self.pooled[rows])
        assert self.mask is not None
        tokens, mask = self.tokens[rows.to(self.tokens.device)], self.mask[rows.to(self.mask.device)]
        # Drop trailing columns that are padding in every selected row (valid tokens may sit anywhere).
        valid = mask.any(dim=0).nonzero()
        keep = int(valid.max()) + 1 if valid.numel() else 1
        return Embeddings(self.pooled[rows], tokens[:, :keep], mask[:, :keep])

    def float_cpu(self) -> Embeddings:
        """Float32 copies on the CPU (what the evaluator keeps between batches)."""
        return Embeddings(self.pooled.detach().float().cpu(),
                          None if self.tokens is None else self.tokens.detach().float().cpu(),
                          None if self.mask is None else self.mask.detach().cpu())

    @classmethod
    def cat(cls, parts: Sequence[Embeddings]) -> Embeddings:
        """Concatenate along rows, zero-padding token tensors to the longest one."""
        if not parts:
            raise ConfigError("Embeddings.cat: nothing to concatenate")
        pooled = torch.cat([p.pooled for p in parts])
        with_tokens = [p.tokens is not None for p in parts]
        if not any(with_tokens):
            return cls(pooled)
        if not all(with_tokens):
            raise ConfigError("Embeddings.cat: some parts have tokens and others not")
        longest = max(int(p.tokens.shape[1]) for p in parts)  # type: ignore[union-attr]
        tokens = torch.cat([torch.nn.functional.pad(p.tokens, (0, 0, 0, longest - p.tokens.shape[1]))  # type: ignore
                            for p in parts])
        mask = torch.cat([torch.nn.functional.pad(p.mask, (0, longest - p.mask.shape[1]))  # type: ignore
                          for p in parts])
        return cls(pooled, tokens, mask)


@dataclass
class StepOutput:
    """The result of a model's training step.

    Attributes:
        losses: name → scalar tensor, each already multiplied by its weight; the trainer back-propagates
            their sum and logs each one as ``loss/<name>`` (a weight that is 0 at this step can be left out).
        metrics: name → scalar (tensor or number) logged beside the losses (e.g. the logit scale).
    """

    losses: dict[str, Tensor]
    metrics: dict[str, Tensor | float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.losses:
            raise ConfigError("StepOutput.losses: a step must return at least one named loss")
        for name, value in self.losses.items():
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ConfigError(f"StepOutput.losses[{name!r}]: must be a scalar tensor, got {value!r}")

    @property
    def loss(self) -> Tensor:
        """The sum the trainer back-propagates."""
        values = list(self.losses.values())
        total = values[0].reshape(())
        for v in values[1:]:
            total = total + v.reshape(())
        return total


__all__ = [
    "IMAGE_KINDS",
    "SPEECH_KINDS",
    "Batch",
    "Embeddings",
    "ImageInputs",
    "ImageKind",
    "SpeechInputs",
    "SpeechKind",
    "StepOutput",
    "TrainState",
]
