"""Analyses of the SpeechCLIP paper, and the reference's batch composition.

* :func:`plot_keyword_attention` — each keyword slot's attention over the frames of one utterance, with the
  waveform above (the paper's Fig. 3); ``vgskit keywords --attention-plot PNG`` draws it from a checkpoint
  (the weights come from :meth:`vgskit.models.speechclip.SpeechCLIP.keyword_attention`).
* :func:`keyword_slot_top_subwords` — the subwords each keyword slot selects most often over a dataset (the
  paper's Table 5); the ``keyword_hit_rate`` evaluation reports them as ``top_subwords``.
* :class:`ShuffledCaptionBatches` — the reference's training batches: a uniform shuffle of all captions cut
  into full batches (``DataLoader(shuffle=True, drop_last=True)`` over one item per caption), so two captions
  of one image can share a batch. vgskit's trainer forms batches with
  :func:`vgskit.data.loader.paired_batch_sampler` (distinct images per batch); this class has the same
  ``batch_sampler_factory(epoch, seed)`` interface, for a trainer that offers the choice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from vgskit.data.loader import ShuffledBatches

__all__ = [
    "AttentionPlot",
    "ShuffledCaptionBatches",
    "keyword_slot_top_subwords",
    "plot_keyword_attention",
]


# ---------------------------------------------------------------------------------------------------------
# Keyword-to-frame attention (Fig. 3)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class AttentionPlot:
    """What :func:`plot_keyword_attention` drew.

    Attributes:
        path: the PNG written.
        matrix: ``[K, T']`` the heat map's values, row ``k`` = slot ``k`` (top row of the plot = slot 1).
        extent: ``(x0, x1, y0, y1)`` of the heat map in data units (seconds; slots).
        xlabel, ylabel: the heat map's axis labels.
        size: ``(width, height)`` of the PNG in pixels.
    """

    path: Path
    matrix: np.ndarray
    extent: tuple[float, float, float, float]
    xlabel: str
    ylabel: str
    size: tuple[int, int]


def plot_keyword_attention(wav: Tensor | np.ndarray, sample_rate: int, attention: Tensor | np.ndarray,
                           frame_rate: float, path: str | Path, *, slot_labels: Sequence[str] | None = None,
                           title: str | None = None, dpi: int = 100) -> AttentionPlot:
    """Heat map of each keyword slot's attention over time, under the utterance's waveform.

    Args:
        wav: ``[T]`` the utterance's samples.
        sample_rate: samples per second of ``wav``.
        attention: ``[K, T']`` attention of each slot over the ``T'`` frames of the utterance (no padding).
        frame_rate: frames per second; frame ``t`` spans ``[t, t + 1) / frame_rate`` seconds.
        path: PNG file to write (matplotlib's Agg backend; no display needed).
        slot_labels: one label per slot for the y axis (e.g. its selected subword); default ``1 .. K``.
        title: plot title.
        dpi: resolution (the figure is 10 × 5 inches).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = np.asarray(wav.detach().cpu() if isinstance(wav, Tensor) else wav, dtype=np.float32).reshape(-1)
    matrix = np.asarray(attention.detach().float().cpu() if isinstance(attention, Tensor) else attention,
                        dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[1] < 1:
        raise ValueError(f"plot_keyword_attention: attention must be [K, T'] with K, T' >= 1, got {matrix.shape}")
    if not (sample_rate > 0 and frame_rate > 0):
        raise ValueError(f"plot_keyword_attention: sample_rate and frame_rate must be > 0 ({sample_rate}, "
                         f"{frame_rate})")
    k, frames = matrix.shape
    labels = [str(i) for i in range(1, k + 1)] if slot_labels is None else [str(s) for s in slot_labels]
    if len(labels) != k:
        raise ValueError(f"plot_keyword_attention: {len(labels)} slot labels for {k} slots")
    seconds = max(frames / frame_rate, len(samples) / sample_rate)
    extent = (0.0, frames / frame_rate, k - 0.5, -0.5)
    xlabel, ylabel = "time (s)", "keyword slot"

    fig, (ax_wav, ax_att) = plt.subplots(2, 1, figsize=(10, 5), dpi=dpi, sharex=True,
                                         gridspec_kw={"height_ratios": [1, 2]})
    ax_wav.plot(np.arange(len(samples)) / sample_rate, samples, lw=0.5, color="tab:blue")
    ax_wav.set_ylabel("amplitude")
    ax_wav.set_xlim(0.0, seconds)
    if title:
        ax_wav.set_title(title)
    image = ax_att.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis", extent=extent)
    ax_att.set_yticks(range(k))
    ax_att.set_yticklabels(labels)
    ax_att.set_xlabel(xlabel)
    ax_att.set_ylabel(ylabel)
    fig.colorbar(image, ax=[ax_wav, ax_att], label="attention", fraction=0.03, pad=0.01)
    drawn = np.asarray(image.get_array(), dtype=np.float32)  # what the heat map shows
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    size = tuple(int(v) for v in fig.canvas.get_width_height())
    plt.close(fig)
    return AttentionPlot(out, drawn, extent, xlabel, ylabel, (size[0], size[1]))


# ---------------------------------------------------------------------------------------------------------
# Most frequent subwords per slot (Table 5)
# ---------------------------------------------------------------------------------------------------------


def keyword_slot_top_subwords(top1_tokens: Sequence[Sequence[Hashable]], top_n: int = 10,
                              decode: Callable[[Hashable], Hashable] | None = None) -> list[list[tuple[Hashable, int]]]:
    """The ``top_n`` subwords each keyword slot selects most often, with their counts.

    Args:
        top1_tokens: per caption, the token each of the ``K`` slots selected (``[N][K]``; ids or strings).
        top_n: how many subwords per slot.
        decode: applied to each token before counting (e.g. id → text); default: the tokens themselves.

    Returns:
        ``K`` lists of ``(token, count)``, most frequent first; ties keep the order of first occurrence
        (:meth:`collections.Counter.most_common`).
    """
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    rows = [list(r) for r in top1_tokens]
    if not rows:
        return []
    k = len(rows[0])
    if any(len(r) != k for r in rows):
        raise ValueError(f"every caption needs one token per slot ({k}); got rows of {sorted({len(r) for r in rows})}")
    counters = [Counter() for _ in range(k)]  # type: list[Counter[Hashable]]
    for row in rows:
        for slot, token in enumerate(row):
            counters[slot][decode(token) if decode is not None else token] += 1
    return [c.most_common(top_n) for c in counters]


# ---------------------------------------------------------------------------------------------------------
# Reference batch composition
# ---------------------------------------------------------------------------------------------------------


#: The reference's batches (all captions shuffled, full batches): the data pipeline's
#: :class:`~vgskit.data.loader.ShuffledBatches`, which ``data.batch_sampler: shuffled`` gives the trainer.
ShuffledCaptionBatches = ShuffledBatches
