"""Dataset, collation and batch sampling for spoken captions paired with images.

* :class:`SpokenCaptionDataset` serves one caption per item (waveform + its image). With ``preload=True``
  every waveform is decoded once into int16 and every image once into uint8 at the target size, because
  decoding WAV/PNG files on every step costs more than a training step on two CPU cores. Long captions are
  cropped to ``max_seconds``: their first seconds (``crop="head"``) or a random window (``crop="random"``,
  SpeechCLIP's training crop; see "Random crops" below).
* :func:`collate_spoken_captions` pads waveforms to a multiple of ``pad_multiple`` samples (default
  ``32 · 160``: 32 frames of 10 ms), so the number of distinct batch shapes stays small while padding stays
  below 0.32 s per batch.
* :func:`paired_batch_sampler` builds GLOBAL batches of ``batch_size / captions_per_image`` distinct images
  with ``captions_per_image`` of their captions each, deterministically from ``(seed, epoch)``.

Random crops
------------
With ``crop="random"`` the window of caption ``i`` in epoch ``e`` starts at an offset drawn from
``numpy.random.default_rng([seed, e, i, CROP_STREAM])``: a pure function of the training seed, the epoch
and the caption index. It does not depend on the process (DDP rank), the DataLoader worker that loads the
item, the number of workers or where in the epoch a run was resumed, so a resumed run and a run on N
processes see exactly the windows a single uninterrupted process sees, and every epoch sees new windows.

The seed and epoch reach the dataset through :meth:`SpokenCaptionDataset.set_epoch`. The trainer calls its
``batch_sampler_factory(epoch, seed)`` once per epoch, on every rank, right before it builds that epoch's
DataLoader; :class:`PairedBatches` forwards that call to its ``on_epoch`` hook (pass the dataset's
``set_epoch``). Worker processes receive a copy of the dataset when the epoch's loader starts, so they see
the epoch it was set to (the trainer builds a new loader, with new workers, every epoch).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vgskit.data.manifest import Record
from vgskit.errors import ConfigError
from vgskit.images import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_PAD_MULTIPLE = 32 * 160
CROP_MODES = ("head", "random")
#: Last entropy word of the random-crop seed, so crop offsets never share a stream with the batch sampler's
#: ``default_rng([seed, epoch])``.
CROP_STREAM = 0x63726F70
CropMode = Literal["head", "random"]


def _load_audio(path: str, sample_rate: int) -> np.ndarray:
    from vgskit.audio import load_audio

    return load_audio(path, sample_rate=sample_rate)


def _load_image_uint8(path: str, size: int, resize_mode: str, interpolation: str) -> np.ndarray:
    from vgskit.images import ImageTransform, load_image

    transform = ImageTransform(size=size, resize_mode=resize_mode, interpolation=interpolation)  # type: ignore[arg-type]
    return np.asarray(transform.resize(load_image(path)), dtype=np.uint8)  # [S, S, 3]


def _progress(iterable: Any, total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="file")


class SpokenCaptionDataset(Dataset):
    """Spoken captions with their images, one item per caption.

    Args:
        records: manifest records (absolute or already-resolved paths).
        image_size: side of the square images returned.
        preload: decode everything once into memory (int16 audio, uint8 images).
        sample_rate: audio sample rate.
        max_seconds: crop longer captions to ``max_seconds`` (``None``: keep all).
        crop: ``"head"`` keeps the first ``max_seconds``; ``"random"`` a window of ``max_seconds`` at a random
            offset, drawn anew every epoch from ``(crop_seed, epoch, index)`` (see the module docstring).
            Captions no longer than ``max_seconds`` are kept whole either way.
        crop_seed: seed of the random crops until :meth:`set_epoch` sets one.
        mean: per-channel mean for normalising pixels in [0, 1] (ImageNet by default).
        std: per-channel std (ImageNet by default).
        resize_mode: ``"squash"`` (whole image, default) or ``"shorter_side_center_crop"``.
        interpolation: PIL resampling filter name.
        progress: show tqdm progress bars while preloading.

    Items are dicts: ``wav`` (float32 ``[T]``), ``length`` (int), ``pixels`` (float32 ``[3, S, S]``),
    ``image_index`` (int, index into :attr:`image_keys`) and ``caption_index`` (int, index into ``records``).
    """

    def __init__(
        self,
        records: Sequence[Record],
        image_size: int = 64,
        preload: bool = False,
        sample_rate: int = 16000,
        max_seconds: float | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        resize_mode: str = "squash",
        interpolation: str = "bilinear",
        progress: bool = True,
        crop: CropMode = "head",
        crop_seed: int = 0,
    ):
        if not records:
            raise ConfigError("SpokenCaptionDataset: no records")
        if image_size <= 0:
            raise ConfigError(f"SpokenCaptionDataset: image_size must be positive, got {image_size}")
        if crop not in CROP_MODES:
            raise ConfigError(f"SpokenCaptionDataset: crop must be one of {CROP_MODES}, got {crop!r}")
        if max_seconds is not None and not max_seconds > 0:
            raise ConfigError(f"SpokenCaptionDataset: max_seconds must be positive or None, got {max_seconds!r}")
        self.records = list(records)
        self.image_size = image_size
        self.sample_rate = sample_rate
        self.max_samples = None if max_seconds is None else int(round(max_seconds * sample_rate))
        self.crop = crop
        self.crop_seed = int(crop_seed)
        self.epoch = 0
        self.resize_mode = resize_mode
        self.interpolation = interpolation
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        # Images in order of first appearance; every caption points at one of them.
        index_of: dict[str, int] = {}
        self.image_keys: list[str] = []
        self.image_paths: list[str] = []
        self.caption_image_index: list[int] = []
        for r in self.records:
            if r.image_id not in index_of:
                index_of[r.image_id] = len(self.image_keys)
                self.image_keys.append(r.image_id)
                self.image_paths.append(r.image)
            self.caption_image_index.append(index_of[r.image_id])
        self._audio: list[np.ndarray] | None = None
        self._images: np.ndarray | None = None
        if preload:
            self.preload(progress)

    def preload(self, progress: bool = True, *, audio: bool = True, images: bool = True) -> None:
        """Decode all audio (stored int16) and all images (stored uint8 at ``image_size``) into memory.

        ``audio=False`` / ``images=False`` leave that part on disk (e.g. when a feature cache serves it).
        Random crops keep whole utterances in memory, since every epoch cuts another window.
        """
        if audio:
            stored = []
            for r in _progress(self.records, len(self.records), "audio", progress):
                wav = _load_audio(r.audio, self.sample_rate)
                wav = wav if self.crop == "random" else self._head(wav)
                # Same scale both ways (x32768 here, /32768 in waveform()), clipped to the int16 range.
                stored.append(np.clip(np.round(wav * 32768.0), -32768, 32767).astype(np.int16))
            self._audio = stored
        if images:
            s = self.image_size
            pixels = np.empty((len(self.image_paths), s, s, 3), dtype=np.uint8)
            for i, path in enumerate(_progress(self.image_paths, len(self.image_paths), "images", progress)):
                pixels[i] = _load_image_uint8(path, s, self.resize_mode, self.interpolation)
            self._images = pixels

    @property
    def preloaded(self) -> bool:
        """Whether audio and images are held in memory."""
        return self._audio is not None and self._images is not None

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        """Select the random crops of ``epoch`` (and the seed they derive from, if given).

        Only random crops depend on it. Pass it as :class:`PairedBatches`'s ``on_epoch`` hook so that the
        trainer's seed and epoch reach the dataset before each epoch's loader starts.
        """
        self.epoch = int(epoch)
        if seed is not None:
            self.crop_seed = int(seed)

    def crop_offset(self, index: int, length: int) -> int:
        """First sample of the window kept of caption ``index`` whose full waveform has ``length`` samples."""
        if self.crop != "random" or self.max_samples is None or length <= self.max_samples:
            return 0
        rng = np.random.default_rng([self.crop_seed, self.epoch, int(index), CROP_STREAM])
        return int(rng.integers(0, length - self.max_samples + 1))

    def _head(self, wav: np.ndarray) -> np.ndarray:
        return wav if self.max_samples is None else wav[: self.max_samples]

    def _crop(self, wav: Any, index: int) -> Any:
        if self.max_samples is None:
            return wav
        start = self.crop_offset(index, len(wav))
        return wav[start : start + self.max_samples]

    def num_samples(self) -> list[int]:
        """Waveform length (after cropping) of every caption in samples, for length bucketing.

        Preloaded: exact. Otherwise read from the file headers (no decoding), resampled to ``sample_rate``.
        A random crop has the length of a head crop (``min(length, max_samples)``), so bucketing sees the
        lengths the batches will have.
        """
        if self._audio is not None:
            n = [len(a) for a in self._audio]
            return n if self.max_samples is None else [min(x, self.max_samples) for x in n]
        from vgskit.audio import audio_duration

        n = [int(round(audio_duration(r.audio) * self.sample_rate)) for r in self.records]
        return n if self.max_samples is None else [min(x, self.max_samples) for x in n]

    def __len__(self) -> int:
        return len(self.records)

    def pixels(self, image_index: int) -> Tensor:
        """Normalised pixels ``[3, S, S]`` of image ``image_index`` (an index into :attr:`image_keys`)."""
        if self._images is not None:
            arr = self._images[image_index]
        else:
            arr = _load_image_uint8(
                self.image_paths[image_index], self.image_size, self.resize_mode, self.interpolation
            )
        x = torch.tensor(arr).permute(2, 0, 1).float().div_(255.0)  # [3, S, S] (copy: PIL arrays are read-only)
        return (x - self.mean) / self.std

    def waveform(self, index: int) -> Tensor:
        """The (cropped) float32 waveform ``[T]`` of caption ``index`` (random crops: this epoch's window)."""
        if self._audio is not None:
            return torch.from_numpy(self._crop(self._audio[index], index).astype(np.float32) / 32768.0)
        wav = self._crop(_load_audio(self.records[index].audio, self.sample_rate), index)
        return torch.from_numpy(np.ascontiguousarray(wav))

    def __getitem__(self, index: int) -> dict[str, Any]:
        wav = self.waveform(index)
        image_index = self.caption_image_index[index]
        return {
            "wav": wav,
            "length": int(wav.shape[0]),
            "pixels": self.pixels(image_index),
            "image_index": image_index,
            "caption_index": index,
        }


def collate_spoken_captions(
    items: Sequence[dict[str, Any]], pad_multiple: int = DEFAULT_PAD_MULTIPLE
) -> dict[str, Tensor]:
    """Stack dataset items into a batch.

    Returns ``wavs`` ``[B, T]`` (zero-padded, ``T`` = longest length rounded up to ``pad_multiple``),
    ``lengths`` ``[B]``, ``pixels`` ``[B, 3, S, S]``, ``image_ids`` ``[B]`` (image index of each caption) and
    ``caption_ids`` ``[B]``.
    """
    if not items:
        raise ConfigError("collate_spoken_captions: empty batch")
    lengths = torch.tensor([int(it["length"]) for it in items], dtype=torch.long)
    longest = int(lengths.max())
    total = -(-longest // pad_multiple) * pad_multiple if pad_multiple > 1 else longest
    wavs = torch.zeros(len(items), total, dtype=torch.float32)
    for row, it in enumerate(items):
        wavs[row, : it["length"]] = it["wav"]
    return batch_dict(wavs, lengths, items)


def batch_dict(wavs: Tensor, lengths: Tensor, items: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    """The training batch layout shared by every collate: padded speech inputs + lengths, pixels, ids."""
    return {
        "wavs": wavs,
        "lengths": lengths,
        "pixels": torch.stack([it["pixels"] for it in items]),
        "image_ids": torch.tensor([int(it["image_index"]) for it in items], dtype=torch.long),
        "caption_ids": torch.tensor([int(it["caption_index"]) for it in items], dtype=torch.long),
    }


def paired_batch_sampler(
    caption_image_idx: Sequence[int] | Sequence[Record],
    batch_size: int,
    captions_per_image: int = 2,
    seed: int = 0,
    epoch: int = 0,
    lengths: Sequence[int] | None = None,
    bucket_batches: int = 50,
) -> list[list[int]]:
    """GLOBAL batches of ``batch_size // captions_per_image`` distinct images × ``captions_per_image`` captions.

    Each epoch is a sequence of *rounds*. In round ``r`` every image that still has ``captions_per_image``
    unused captions contributes one group of that many captions (drawn at random); groups are shuffled and
    cut into batches, so the images within a batch are always distinct. A round's last incomplete batch is
    dropped (at most ``batch_size / captions_per_image - 1`` groups; a different set every epoch), and so are
    images with fewer than ``captions_per_image`` captions. With ``lengths`` (samples per caption), groups are
    sorted by length within buckets of ``bucket_batches`` batches before cutting, which reduces padding.
    Batches are finally shuffled; the captions of one image are adjacent within a batch, so a contiguous
    split of a global batch over processes keeps them together when the per-process size is a multiple of
    ``captions_per_image``.

    Args:
        caption_image_idx: image index of every caption (or the records themselves, grouped by ``image_id``).
        batch_size: captions per global batch (a multiple of ``captions_per_image``).
        captions_per_image: captions of each image in a batch.
        seed: base seed; the result is a pure function of ``(seed, epoch)`` and the arguments.
        epoch: epoch number.
        lengths: optional caption lengths for length bucketing.
        bucket_batches: bucket size, in batches, for length bucketing.

    Returns:
        A list of batches, each a list of caption indices.
    """
    if captions_per_image < 1 or batch_size < captions_per_image or batch_size % captions_per_image:
        raise ConfigError(
            f"paired_batch_sampler: batch_size ({batch_size}) must be a positive multiple of "
            f"captions_per_image ({captions_per_image})"
        )
    image_idx = _image_indices(caption_image_idx)
    if lengths is not None and len(lengths) != len(image_idx):
        raise ConfigError(f"paired_batch_sampler: {len(lengths)} lengths for {len(image_idx)} captions")
    rng = np.random.default_rng([int(seed), int(epoch)])
    by_image: dict[int, list[int]] = {}
    for caption, image in enumerate(image_idx):
        by_image.setdefault(image, []).append(caption)
    # Shuffle each image's captions once; round r takes the r-th group of captions_per_image.
    pools = [np.asarray(caps)[rng.permutation(len(caps))].tolist() for _, caps in sorted(by_image.items())]
    images_per_batch = batch_size // captions_per_image
    batches: list[list[int]] = []
    for r in range(max((len(p) for p in pools), default=0) // captions_per_image):
        lo, hi = r * captions_per_image, (r + 1) * captions_per_image
        groups = [p[lo:hi] for p in pools if len(p) >= hi]
        order = rng.permutation(len(groups))
        groups = [groups[i] for i in order]
        n_full = len(groups) // images_per_batch * images_per_batch
        groups = groups[:n_full]
        if lengths is not None:
            bucket = images_per_batch * max(1, bucket_batches)
            sorted_groups: list[list[int]] = []
            for start in range(0, len(groups), bucket):
                chunk = groups[start : start + bucket]
                sorted_groups.extend(sorted(chunk, key=lambda g: max(lengths[c] for c in g)))
            groups = sorted_groups
        for start in range(0, n_full, images_per_batch):
            batches.append([c for g in groups[start : start + images_per_batch] for c in g])
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


class PairedBatches:
    """A ``batch_sampler_factory(epoch, seed) -> list[list[int]]`` around :func:`paired_batch_sampler`.

    ``on_epoch(epoch, seed)``, if given, is called first on every call: the trainer calls the factory once
    per epoch before building that epoch's loader, which is how a dataset learns the epoch of its random
    crops (see the module docstring). Also offers ``num_batches(epoch)`` (it depends only on caption counts, not on the seed), so a trainer can
    size its schedule without drawing every epoch.
    """

    def __init__(
        self,
        caption_image_idx: Sequence[int] | Sequence[Record],
        batch_size: int,
        captions_per_image: int = 2,
        lengths: Sequence[int] | None = None,
        bucket_batches: int = 50,
        on_epoch: Callable[[int, int], None] | None = None,
    ):
        self.image_idx = _image_indices(caption_image_idx)
        self.batch_size = batch_size
        self.captions_per_image = captions_per_image
        self.lengths = None if lengths is None else list(lengths)
        self.bucket_batches = bucket_batches
        self.on_epoch = on_epoch
        # validates the arguments once, up front
        paired_batch_sampler(self.image_idx[:0], batch_size, captions_per_image)

    def __call__(self, epoch: int, seed: int) -> list[list[int]]:
        if self.on_epoch is not None:
            self.on_epoch(epoch, seed)  # e.g. SpokenCaptionDataset.set_epoch: this epoch's random crops
        return paired_batch_sampler(
            self.image_idx, self.batch_size, self.captions_per_image, seed=seed, epoch=epoch,
            lengths=self.lengths, bucket_batches=self.bucket_batches,
        )

    def num_batches(self, epoch: int = 0) -> int:
        """Batches per epoch (the same for every epoch and seed)."""
        per_image = Counter(self.image_idx)
        images_per_batch = self.batch_size // self.captions_per_image
        rounds = max(per_image.values(), default=0) // self.captions_per_image
        return sum(
            sum(1 for n in per_image.values() if n >= (r + 1) * self.captions_per_image) // images_per_batch
            for r in range(rounds)
        )


def paired_batch_sampler_factory(
    caption_image_idx: Sequence[int] | Sequence[Record],
    batch_size: int,
    captions_per_image: int = 2,
    lengths: Sequence[int] | None = None,
    bucket_batches: int = 50,
    on_epoch: Callable[[int, int], None] | None = None,
) -> PairedBatches:
    """Shorthand for :class:`PairedBatches` (a ``batch_sampler_factory(epoch, seed)`` for the trainer)."""
    return PairedBatches(caption_image_idx, batch_size, captions_per_image, lengths, bucket_batches, on_epoch)


def _image_indices(caption_image_idx: Sequence[int] | Sequence[Record]) -> list[int]:
    if caption_image_idx and isinstance(caption_image_idx[0], Record):
        index_of: dict[str, int] = {}
        return [index_of.setdefault(r.image_id, len(index_of)) for r in caption_image_idx]  # type: ignore[union-attr]
    return [int(i) for i in caption_image_idx]  # type: ignore[arg-type]
