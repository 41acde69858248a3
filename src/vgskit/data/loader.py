"""Dataset, collation and batch sampling for spoken captions paired with images.

* :class:`SpokenCaptionDataset` serves one caption per item (waveform + its image). With ``preload=True``
  every waveform is decoded once into int16 and every image once into uint8 at the target size, because
  decoding WAV/PNG files on every step costs more than a training step on two CPU cores. Long captions are
  cropped to ``max_seconds``: their first seconds (``crop="head"``) or a random window (``crop="random"``,
  a common training crop; see "Random crops" below).
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
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vgskit.contract import Batch, ImageInputs, SpeechInputs
from vgskit.data.augment import AugmentConfig
from vgskit.data.manifest import Record
from vgskit.errors import ConfigError
from vgskit.images import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_PAD_MULTIPLE = 32 * 160
CROP_MODES = ("head", "random")
#: What a caption's "speech" is in a dataset: its audio, or its transcript (models that read text).
SPEECH_SOURCES = ("audio", "text")
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


class RegionSource:
    """Region features of a dataset's images from a BUTD/LXMERT HDF5 file, by image id (FaST-VGS input).

    Every image gets exactly ``num_regions`` rows, most confident first: extra detections are dropped and
    images with fewer are padded with zeros, with ``region_mask`` False on the padding. The file is opened
    lazily in each process (HDF5 handles cannot cross into loader workers).
    """

    def __init__(self, path: str | Path, num_regions: int = 36):
        if num_regions < 1:
            raise ConfigError(f"num_regions: must be >= 1, got {num_regions}")
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"region features {self.path}: file not found")
        self.num_regions = int(num_regions)
        self._reader: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "num_regions": self.num_regions, "_reader": None}

    def _open(self) -> Any:
        if self._reader is None:
            from vgskit.encoders.regions import RegionFeatureReader

            self._reader = RegionFeatureReader(self.path)
        return self._reader

    def check_ids(self, image_ids: Sequence[str]) -> None:
        """A clear error naming the file and the first image ids it lacks."""
        reader = self._open()
        missing = [i for i in image_ids if i not in reader]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ConfigError(f"region features {self.path}: no regions for {len(missing)} of {len(image_ids)} "
                              f"images ({shown})")

    def item(self, image_id: str) -> dict[str, Tensor]:
        """``regions [N, F]``, ``boxes [N, 4]`` and ``region_mask [N]`` of one image."""
        found = self._open()[image_id]
        n = min(self.num_regions, int(found.features.shape[0]))
        regions = torch.zeros(self.num_regions, found.features.shape[1])
        boxes = torch.zeros(self.num_regions, 4)
        mask = torch.zeros(self.num_regions, dtype=torch.bool)
        regions[:n], boxes[:n], mask[:n] = found.features[:n], found.boxes[:n], True
        return {"regions": regions, "boxes": boxes, "region_mask": mask}


class SpeechFeatureSource:
    """Precomputed speech frames of a dataset's captions, by caption (utterance) id (``data.speech_features``).

    Two layouts: an HDF5 file with one ``[T, F]`` float dataset per utterance, named by the manifest's
    caption id, and ``frame_rate`` (frames per second) in the attributes of the file or of each dataset; or a
    folder of ``<caption_id>.npy`` arrays ``[T, F]`` with a ``meta.json`` holding ``{"frame_rate": ...}``.
    Every utterance must have the same width ``F`` and rate. The HDF5 file is opened lazily in each process
    (its handles cannot cross into loader workers); ``.npy`` files are read when an item is served.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.is_folder = self.path.is_dir()
        if not self.is_folder and not self.path.is_file():
            raise ConfigError(f"speech features {self.path}: file not found")
        self._reader: Any = None
        self.frame_rate = self._file_rate()  # None: per-utterance rates, read by check_ids
        self.feature_dim: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}

    def _open(self) -> Any:
        if self._reader is None and not self.is_folder:
            import h5py

            try:
                self._reader = h5py.File(self.path, "r")
            except OSError as e:
                raise ConfigError(f"speech features {self.path}: not a readable HDF5 file ({e})") from e
        return self._reader

    def _file_rate(self) -> float | None:
        if self.is_folder:
            meta = self.path / "meta.json"
            if not meta.is_file():
                raise ConfigError(f"speech features {self.path}: a folder of .npy features needs a meta.json "
                                  'with {"frame_rate": <frames per second>}')
            import json

            try:
                rate = json.loads(meta.read_text())["frame_rate"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"speech features {meta}: no frame_rate in it ({e!r})") from e
            return self._check_rate(rate, str(meta))
        rate = self._open().attrs.get("frame_rate")
        return None if rate is None else self._check_rate(rate, str(self.path))

    def _check_rate(self, rate: Any, where: str) -> float:
        try:
            value = float(np.asarray(rate).reshape(()))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"speech features {where}: frame_rate must be a number, got {rate!r}") from e
        if not value > 0:
            raise ConfigError(f"speech features {where}: frame_rate must be positive, got {value}")
        return value

    def _npy(self, utt_id: str) -> Path:
        return self.path / f"{utt_id}.npy"

    def __contains__(self, utt_id: str) -> bool:
        if self.is_folder:
            return self._npy(utt_id).is_file()
        reader = self._open()
        return utt_id in reader and hasattr(reader[utt_id], "shape")

    def _shape_and_rate(self, utt_id: str) -> tuple[tuple[int, ...], float | None]:
        if self.is_folder:
            return tuple(np.load(self._npy(utt_id), mmap_mode="r").shape), self.frame_rate
        found = self._open()[utt_id]
        rate = found.attrs.get("frame_rate")
        return tuple(found.shape), (self.frame_rate if rate is None else self._check_rate(rate, f"{self.path}:{utt_id}"))

    def check_ids(self, utt_ids: Sequence[str]) -> None:
        """Clear errors naming the file: utterances it lacks (how many, the first few), frames that are not
        ``[T, F]`` or differ in width, and a missing or inconsistent frame rate. Sets :attr:`feature_dim` and
        :attr:`frame_rate`."""
        missing = [u for u in utt_ids if u not in self]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ConfigError(f"speech features {self.path}: no frames for {len(missing)} of {len(utt_ids)} "
                              f"utterances ({shown})")
        for u in utt_ids:
            shape, rate = self._shape_and_rate(u)
            if len(shape) != 2 or shape[1] < 1:
                raise ConfigError(f"speech features {self.path}: utterance {u!r} has shape {shape}, expected "
                                  "[frames, feature_dim]")
            if self.feature_dim is None:
                self.feature_dim = int(shape[1])
            elif shape[1] != self.feature_dim:
                raise ConfigError(f"speech features {self.path}: utterance {u!r} has {shape[1]}-d frames, others "
                                  f"{self.feature_dim}-d")
            if rate is None:
                raise ConfigError(f"speech features {self.path}: no frame_rate attribute (on the file or on "
                                  f"utterance {u!r})")
            if self.frame_rate is None:
                self.frame_rate = rate
            elif rate != self.frame_rate:
                raise ConfigError(f"speech features {self.path}: utterance {u!r} is at {rate} frames/s, others at "
                                  f"{self.frame_rate}")

    def num_frames(self, utt_id: str) -> int:
        return self._shape_and_rate(utt_id)[0][0]

    def frames(self, utt_id: str, start: int = 0, stop: int | None = None) -> Tensor:
        """float32 frames ``[T, F]`` of one utterance, rows ``start:stop`` (only those are read)."""
        if self.is_folder:
            arr = np.load(self._npy(utt_id), mmap_mode="r")[start:stop]
        else:
            arr = self._open()[utt_id][start:stop]
        return torch.from_numpy(np.array(arr, dtype=np.float32))  # a writable copy


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
        augment: a train-time image augmentation (:mod:`vgskit.data.augment`, e.g. RandomResizedCrop + flip)
            applied to each item's image, drawn from ``(crop_seed, epoch, index)`` like the random crops;
            :meth:`pixels` and :meth:`image_inputs` (evaluation, indexing) never augment.
        regions: serve each image as region features from this source instead of pixels (models whose
            ``image_input`` is ``"regions"``); images are then never decoded.
        extra_fields: manifest fields (beyond the schema's) each item carries under ``extras`` and batches
            carry in :attr:`vgskit.contract.Batch.extras` (word alignments, ASR transcripts, ...).
        speech_source: ``"audio"`` (default) or ``"text"``: serve each caption's transcript (the manifest's
            ``text``) instead of its audio, as :class:`~vgskit.contract.SpeechInputs` of kind ``text``, for
            models whose ``speech_input`` is ``"text"``; audio is then never decoded and crops do not apply.
        speech_features: serve each caption's precomputed frames from this source (by caption id) instead of
            its audio, for models that read ``features``; audio is then never decoded, ``max_seconds`` crops
            ``round(max_seconds * frame_rate)`` frames (head or random window, as for audio), and frames are
            read from the source when an item is served (``preload`` loads only the images).

    Items are dicts: ``wav`` (float32 ``[T]``), ``length`` (int), ``pixels`` (float32 ``[3, S, S]``),
    ``image_index`` (int, index into :attr:`image_keys`) and ``caption_index`` (int, index into ``records``);
    with ``speech_features``, ``feats`` (float32 ``[T, F]``), ``length`` (frames) and ``frame_rate`` replace
    ``wav`` and its length.
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
        regions: RegionSource | None = None,
        extra_fields: Sequence[str] = (),
        augment: AugmentConfig | None = None,
        speech_source: str = "audio",
        speech_features: SpeechFeatureSource | None = None,
    ):
        if not records:
            raise ConfigError("SpokenCaptionDataset: no records")
        if speech_source not in SPEECH_SOURCES:
            raise ConfigError(f"SpokenCaptionDataset: speech_source must be one of {SPEECH_SOURCES}, "
                              f"got {speech_source!r}")
        if speech_source == "text":
            untranscribed = [r.caption_id for r in records if not r.text]
            if untranscribed:
                raise ConfigError(
                    f"SpokenCaptionDataset: the model reads transcripts, but {len(untranscribed)} of {len(records)} "
                    f"captions have no 'text' in the manifest (first: {', '.join(untranscribed[:3])})")
        self.speech_source = speech_source
        if speech_features is not None and speech_source != "audio":
            raise ConfigError(f"SpokenCaptionDataset: speech features replace audio, not {speech_source!r}")
        self.speech_features = speech_features
        if speech_features is not None:
            speech_features.check_ids([r.caption_id for r in records])
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
        # The same crop in frames when precomputed features stand for the audio.
        self.max_frames = None
        if max_seconds is not None and speech_features is not None and speech_features.frame_rate is not None:
            self.max_frames = max(1, int(round(max_seconds * speech_features.frame_rate)))
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
        self.regions = regions
        if regions is not None:
            regions.check_ids(self.image_keys)
        self.extra_fields = tuple(extra_fields)
        self.augment = augment if augment is not None and augment.kind != "none" else None
        if self.augment is not None and regions is not None:
            raise ConfigError("SpokenCaptionDataset: image augmentation applies to pixels, not region features")
        self._audio: list[np.ndarray] | None = None
        self._images: np.ndarray | None = None
        if preload:
            self.preload(progress)

    def preload(self, progress: bool = True, *, audio: bool = True, images: bool = True) -> None:
        """Decode all audio (stored int16) and all images (stored uint8 at ``image_size``) into memory.

        ``audio=False`` / ``images=False`` leave that part on disk (e.g. when a feature cache serves it).
        Random crops keep whole utterances in memory, since every epoch cuts another window.
        """
        if audio and self.speech_source == "audio" and self.speech_features is None:
            stored = []
            for r in _progress(self.records, len(self.records), "audio", progress):
                wav = _load_audio(r.audio, self.sample_rate)
                wav = wav if self.crop == "random" else self._head(wav)
                # Same scale both ways (x32768 here, /32768 in waveform()), clipped to the int16 range.
                stored.append(np.clip(np.round(wav * 32768.0), -32768, 32767).astype(np.int16))
            self._audio = stored
        if images and self.regions is None:
            s = self.image_size
            pixels = np.empty((len(self.image_paths), s, s, 3), dtype=np.uint8)
            for i, path in enumerate(_progress(self.image_paths, len(self.image_paths), "images", progress)):
                pixels[i] = _load_image_uint8(path, s, self.resize_mode, self.interpolation)
            self._images = pixels

    @property
    def preloaded(self) -> bool:
        """Whether audio and images are held in memory."""
        speech = self._audio is not None or self.speech_features is not None
        return speech and (self._images is not None or self.regions is not None)

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        """Select the random crops of ``epoch`` (and the seed they derive from, if given).

        Only random crops depend on it. Pass it as :class:`PairedBatches`'s ``on_epoch`` hook so that the
        trainer's seed and epoch reach the dataset before each epoch's loader starts.
        """
        self.epoch = int(epoch)
        if seed is not None:
            self.crop_seed = int(seed)

    def crop_offset(self, index: int, length: int, limit: int | None = None) -> int:
        """First sample of the window kept of caption ``index`` whose full waveform has ``length`` samples
        (``limit``: the window length in other units, e.g. :attr:`max_frames`; default :attr:`max_samples`)."""
        limit = self.max_samples if limit is None else limit
        if self.crop != "random" or limit is None or length <= limit:
            return 0
        rng = np.random.default_rng([self.crop_seed, self.epoch, int(index), CROP_STREAM])
        return int(rng.integers(0, length - limit + 1))

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
        lengths the batches will have. Transcripts (``speech_source="text"``): their lengths in UTF-8 bytes.
        """
        if self.speech_source == "text":
            return [len(str(r.text).encode("utf-8")) for r in self.records]
        if self.speech_features is not None:  # frames, as the batches will hold them
            n = [self.speech_features.num_frames(r.caption_id) for r in self.records]
            return n if self.max_frames is None else [min(x, self.max_frames) for x in n]
        if self._audio is not None:
            n = [len(a) for a in self._audio]
            return n if self.max_samples is None else [min(x, self.max_samples) for x in n]
        from vgskit.audio import audio_duration

        n = [int(round(audio_duration(r.audio) * self.sample_rate)) for r in self.records]
        return n if self.max_samples is None else [min(x, self.max_samples) for x in n]

    def __len__(self) -> int:
        return len(self.records)

    def _uint8_image(self, image_index: int) -> np.ndarray:
        if self._images is not None:
            return self._images[image_index]
        return _load_image_uint8(self.image_paths[image_index], self.image_size, self.resize_mode, self.interpolation)

    def _normalise(self, arr: np.ndarray) -> Tensor:
        x = torch.tensor(arr).permute(2, 0, 1).float().div_(255.0)  # [3, S, S] (copy: PIL arrays are read-only)
        return (x - self.mean) / self.std

    def pixels(self, image_index: int) -> Tensor:
        """Normalised pixels ``[3, S, S]`` of image ``image_index`` (an index into :attr:`image_keys`); never
        augmented (the evaluation transform)."""
        return self._normalise(self._uint8_image(image_index))

    def train_pixels(self, image_index: int, caption_index: int) -> Tensor:
        """The pixels caption ``caption_index`` trains with: :meth:`pixels`, augmented when ``augment`` is set
        (the window and flip of this epoch, a pure function of ``(crop_seed, epoch, caption_index)``)."""
        arr = self._uint8_image(image_index)
        if self.augment is not None:
            from vgskit.data.augment import augment_image, augment_rng

            arr = augment_image(arr, self.augment, augment_rng(self.crop_seed, self.epoch, caption_index),
                                interpolation=self.interpolation)
        return self._normalise(arr)

    def waveform(self, index: int) -> Tensor:
        """The (cropped) float32 waveform ``[T]`` of caption ``index`` (random crops: this epoch's window)."""
        if self._audio is not None:
            return torch.from_numpy(self._crop(self._audio[index], index).astype(np.float32) / 32768.0)
        wav = self._crop(_load_audio(self.records[index].audio, self.sample_rate), index)
        return torch.from_numpy(np.ascontiguousarray(wav))

    def features(self, index: int) -> Tensor:
        """The (cropped) precomputed frames ``[T, F]`` of caption ``index`` (random crops: this epoch's window)."""
        assert self.speech_features is not None
        utt_id = self.records[index].caption_id
        if self.max_frames is None:
            return self.speech_features.frames(utt_id)
        start = self.crop_offset(index, self.speech_features.num_frames(utt_id), self.max_frames)
        return self.speech_features.frames(utt_id, start, start + self.max_frames)

    def image_item(self, image_index: int) -> dict[str, Tensor]:
        """The image inputs of one image: ``{"pixels": [3, S, S]}`` or its region features."""
        if self.regions is not None:
            return self.regions.item(self.image_keys[image_index])
        return {"pixels": self.pixels(image_index)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_index = self.caption_image_index[index]
        image = ({"pixels": self.train_pixels(image_index, index)} if self.regions is None
                 else self.image_item(image_index))
        item: dict[str, Any] = {"image_index": image_index, "caption_index": index, **image}
        if self.speech_source == "text":
            item["text"] = str(self.records[index].text)
        elif self.speech_features is not None:
            feats = self.features(index)
            item.update(feats=feats, length=int(feats.shape[0]), frame_rate=self.speech_features.frame_rate)
        else:
            wav = self.waveform(index)
            item.update(wav=wav, length=int(wav.shape[0]))
        if self.extra_fields:
            record_extra = self.records[index].extra
            item["extras"] = {name: record_extra.get(name) for name in self.extra_fields}
        return item

    def speech_inputs(self, indices: Sequence[int]) -> SpeechInputs:
        """Waveforms of captions ``indices``, zero-padded to the longest (evaluation batches); their transcripts
        for ``speech_source="text"``."""
        if self.speech_source == "text":
            return SpeechInputs.from_texts([str(self.records[i].text) for i in indices])
        if self.speech_features is not None:
            assert self.speech_features.frame_rate is not None
            return pad_features([self.features(i) for i in indices], self.speech_features.frame_rate)
        wavs = [self.waveform(i) for i in indices]
        values = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)  # [B, T]
        return SpeechInputs.waveform(values, torch.tensor([len(w) for w in wavs]), self.sample_rate)

    def image_inputs(self, image_indices: Sequence[int]) -> ImageInputs:
        """Image inputs of images ``image_indices`` (indices into :attr:`image_keys`)."""
        return collate_images([self.image_item(i) for i in image_indices])


def collate_spoken_captions(
    items: Sequence[dict[str, Any]], pad_multiple: int = DEFAULT_PAD_MULTIPLE, sample_rate: int = 16000
) -> Batch:
    """Stack dataset items into a :class:`~vgskit.contract.Batch` of waveforms and images.

    Waveforms are zero-padded to ``[B, T]`` (``T`` = longest length rounded up to ``pad_multiple``) with
    ``lengths [B]`` in samples (items of precomputed frames: ``[B, T, F]`` padded to the longest, see
    :func:`pad_features`); images are ``pixels [B, 3, S, S]`` or, for items carrying region features,
    ``regions [B, N, F]`` + ``boxes [B, N, 4]`` + ``region_mask [B, N]``.
    """
    if not items:
        raise ConfigError("collate_spoken_captions: empty batch")
    if "text" in items[0]:  # a text dataset (speech_source="text"): transcripts instead of waveforms
        return make_batch(SpeechInputs.from_texts([it["text"] for it in items]), items)
    if "feats" in items[0]:  # precomputed frames (speech_features) instead of waveforms
        return make_batch(pad_features([it["feats"] for it in items], float(items[0]["frame_rate"])), items)
    lengths = torch.tensor([int(it["length"]) for it in items], dtype=torch.long)
    longest = int(lengths.max())
    total = -(-longest // pad_multiple) * pad_multiple if pad_multiple > 1 else longest
    wavs = torch.zeros(len(items), total, dtype=torch.float32)
    for row, it in enumerate(items):
        wavs[row, : it["length"]] = it["wav"]
    return make_batch(SpeechInputs.waveform(wavs, lengths, sample_rate), items)


def pad_features(frames: Sequence[Tensor], frame_rate: float) -> SpeechInputs:
    """Frames ``[T_i, F]`` of each caption → ``SpeechInputs`` of kind ``features``: ``[B, T, F]`` zero-padded to the
    longest, ``lengths [B]`` in frames, ``rate`` in frames per second."""
    lengths = torch.tensor([int(f.shape[0]) for f in frames], dtype=torch.long)
    values = torch.zeros(len(frames), int(lengths.max()), int(frames[0].shape[1]), dtype=torch.float32)  # [B, T, F]
    for row, f in enumerate(frames):
        values[row, : f.shape[0]] = f
    return SpeechInputs("features", values, lengths, float(frame_rate))


def collate_images(items: Sequence[dict[str, Any]]) -> ImageInputs:
    """The image inputs of dataset items: stacked ``pixels``, or stacked region features (see
    :class:`RegionSource`), or cached tower outputs (``tower_outputs``)."""
    first = items[0]
    if "regions" in first:
        return ImageInputs("regions", regions=torch.stack([it["regions"] for it in items]),
                           boxes=torch.stack([it["boxes"] for it in items]),
                           region_mask=torch.stack([it["region_mask"] for it in items]))
    if "tower_outputs" in first:
        return ImageInputs("tower_outputs", tower_outputs=torch.stack([it["tower_outputs"] for it in items]))
    return ImageInputs.from_pixels(torch.stack([it["pixels"] for it in items]))


def make_batch(speech: SpeechInputs, items: Sequence[dict[str, Any]]) -> Batch:
    """The batch every collate returns: the speech inputs, the items' images, ids and extra fields."""
    extras: dict[str, list[Any]] = {}
    for name in first_extras(items):
        extras[name] = [it["extras"].get(name) for it in items]
    return Batch(
        speech=speech,
        image=collate_images(items),
        image_ids=torch.tensor([int(it["image_index"]) for it in items], dtype=torch.long),
        caption_ids=torch.tensor([int(it["caption_index"]) for it in items], dtype=torch.long),
        extras=extras,
    )


def first_extras(items: Sequence[dict[str, Any]]) -> list[str]:
    extras = items[0].get("extras") or {}
    return sorted(extras)


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


class ShuffledBatches:
    """All captions shuffled uniformly and cut into full global batches (``data.batch_sampler: shuffled``).

    One item is one caption with its image; a new permutation every epoch, a pure function of ``(seed, epoch)``,
    so every process and every resumed run cut the same global batches (the trainer shards them); the last
    partial batch is dropped. Unlike :class:`PairedBatches`, the images of a batch are not kept distinct: two
    captions of one image can meet (the losses mask or share such pairs). This is how a plain shuffled
    ``DataLoader(drop_last=True)`` over captions batches, e.g. the SpeechCLIP reference.

    Args:
        num_captions: captions of the training split.
        batch_size: captions per global batch.
        on_epoch: called as ``on_epoch(epoch, seed)`` before each epoch's batches (a dataset's ``set_epoch``).
    """

    def __init__(self, num_captions: int, batch_size: int, on_epoch: Callable[[int, int], None] | None = None):
        if batch_size < 1 or num_captions < batch_size:
            raise ConfigError(f"ShuffledBatches: {num_captions} captions cannot fill one batch of {batch_size}")
        self.num_captions, self.batch_size, self.on_epoch = int(num_captions), int(batch_size), on_epoch

    def num_batches(self, epoch: int = 0) -> int:
        """Full batches per epoch (the same every epoch)."""
        return self.num_captions // self.batch_size

    def __call__(self, epoch: int, seed: int) -> list[list[int]]:
        if self.on_epoch is not None:
            self.on_epoch(epoch, seed)
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        order = torch.randperm(self.num_captions, generator=g).tolist()
        n = self.num_batches(epoch) * self.batch_size
        return [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]


#: ``data.batch_sampler`` values: ``paired`` (:class:`PairedBatches`, distinct images, ``captions_per_image`` each)
#: or ``shuffled`` (:class:`ShuffledBatches`).
BATCH_SAMPLERS = ("paired", "shuffled")


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
