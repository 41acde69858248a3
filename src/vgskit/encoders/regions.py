"""Precomputed Faster R-CNN region features (FaST-VGS image input) in the BUTD/LXMERT HDF5 layout.

Layout: datasets ``img_id`` ``(n,)`` (bytes or str), ``features`` ``(n, R, 2048)``, ``boxes`` ``(n, R, 4)``
as ``x1, y1, x2, y2`` in pixels, ``objects_conf`` ``(n, R)``, and ``img_h``/``img_w`` ``(n,)``; optionally
``num_boxes`` ``(n,)`` (the BUTD field), when images have fewer than ``R`` real regions and the rest of each row
is padding. Readers
return boxes normalised by the image size and regions sorted by decreasing confidence, as FaST-VGS feeds
them. Files without ``img_h``/``img_w`` must already hold normalised boxes (checked: all within [0, 1]).

:func:`write_region_hdf5` writes that layout (pixel boxes plus ``img_h``/``img_w``), so a file it writes loads
with :class:`RegionFeatureReader`.

:class:`RegionDetector` (optional, needs ``pip install vgskit[regions]``, i.e. torchvision) computes region
features with torchvision's COCO Faster R-CNN (``fasterrcnn_resnet50_fpn`` or ``..._v2``). Its features are
the box head's 1024-d representation (RoIAlign over the FPN levels followed by the head's MLP/conv layers) of
the kept detections. **They are not BUTD features**: those are 2048-d mean-pooled ResNet-101 C5 features of
a detector trained on Visual Genome (1600 object classes). A model trained on one kind does not accept the
other; use the detector to get *some* region features on a new image collection, and the reader to use
published BUTD/LXMERT files.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from vgskit.encoders.hub import MissingWeightsError
from vgskit.errors import ConfigError, InputFileError
from vgskit.images import load_image

REQUIRED = ("img_id", "features", "boxes", "objects_conf")


@dataclass
class RegionFeatures:
    """Regions of one image: ``features [R, D]``, normalised ``boxes [R, 4]``, ``confidence [R]`` (sorted)."""

    features: Tensor
    boxes: Tensor
    confidence: Tensor


class RegionFeatureReader:
    """Random access by image id to a BUTD/LXMERT region-feature HDF5 file (opened lazily, read per item)."""

    def __init__(self, path: str | Path):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise InputFileError(self.path, "region-feature HDF5 file not found")
        self._h5 = h5py.File(self.path, "r")
        missing = [k for k in REQUIRED if k not in self._h5]
        if missing:
            raise InputFileError(self.path, f"missing dataset(s) {missing}; expected {list(REQUIRED)}")
        ids = self._h5["img_id"][()]
        self._index = {(i.decode() if isinstance(i, bytes) else str(i)): n for n, i in enumerate(ids)}
        self._has_size = "img_h" in self._h5 and "img_w" in self._h5
        self._num_boxes = np.asarray(self._h5["num_boxes"][()], dtype=np.int64) if "num_boxes" in self._h5 else None
        if self._num_boxes is not None:
            r = int(self._h5["features"].shape[1])
            if self._num_boxes.shape != (len(ids),) or (self._num_boxes < 0).any() or (self._num_boxes > r).any():
                raise InputFileError(self.path, f"num_boxes must hold one count in 0..{r} per image")

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, img_id: str) -> bool:
        return img_id in self._index

    def ids(self) -> list[str]:
        """Image ids in file order."""
        return list(self._index)

    def __getitem__(self, img_id: str) -> RegionFeatures:
        if img_id not in self._index:
            raise KeyError(f"{self.path}: no regions for image id {img_id!r}")
        n = self._index[img_id]
        feats = np.asarray(self._h5["features"][n], dtype=np.float32)  # [R, D]
        boxes = np.asarray(self._h5["boxes"][n], dtype=np.float32)  # [R, 4]
        conf = np.asarray(self._h5["objects_conf"][n], dtype=np.float32)  # [R]
        if self._num_boxes is not None:  # rows past the image's count are padding, not regions
            k = int(self._num_boxes[n])
            feats, boxes, conf = feats[:k], boxes[:k], conf[:k]
        if self._has_size:
            h, w = float(self._h5["img_h"][n]), float(self._h5["img_w"][n])
            boxes = boxes / np.asarray([w, h, w, h], dtype=np.float32)
        elif boxes.size and (boxes.min() < 0 or boxes.max() > 1):
            raise InputFileError(self.path, "boxes are in pixels but img_h/img_w are missing")
        order = np.argsort(-conf, kind="stable")  # most confident first
        return RegionFeatures(
            torch.from_numpy(feats[order]), torch.from_numpy(boxes[order]), torch.from_numpy(conf[order])
        )

    def close(self) -> None:
        """Close the file."""
        self._h5.close()


# --------------------------------------------------------------------------------------------- writing


def write_region_hdf5(path: str | Path, items: Iterable[tuple[str, RegionFeatures, int, int]], *,
                      max_regions: int | None = None) -> int:
    """Write ``(img_id, regions, img_h, img_w)`` items to ``path`` in the BUTD/LXMERT layout; returns the count.

    ``regions.boxes`` are normalised (as :class:`RegionFeatures` holds them) and are stored in pixels next to
    ``img_h``/``img_w``, the layout published files use. Every item must have the same number of regions
    and feature size, unless ``max_regions`` is given: then each image may have 1..``max_regions`` regions,
    rows are zero-padded to ``max_regions`` and ``num_boxes`` records each image's count. Items are streamed into resizable datasets, so a whole corpus never sits in memory.
    The file is written to a temporary name in the same folder and renamed into place only when complete:
    an interrupted run leaves no truncated file that a later reader would take for a finished one.

    Raises:
        ConfigError: no items, inconsistent shapes, a repeated image id or a non-positive image size.
    """
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    seen: set[str] = set()
    if max_regions is not None and max_regions < 1:
        raise ConfigError(f"{path}: max_regions must be >= 1, got {max_regions}")
    try:
        with h5py.File(tmp, "w") as f:
            n = 0
            for img_id, regions, img_h, img_w in items:
                feats = regions.features.detach().to("cpu", torch.float32).numpy()
                boxes = regions.boxes.detach().to("cpu", torch.float64).numpy()
                conf = regions.confidence.detach().to("cpu", torch.float32).numpy()
                img_id = str(img_id)
                if img_id in seen:
                    # The reader indexes by id, so a repeat would silently hide the earlier image.
                    raise ConfigError(f"{path}: image id {img_id!r} given twice")
                seen.add(img_id)
                if img_h <= 0 or img_w <= 0:
                    raise ConfigError(f"{path}: image {img_id!r} has size {img_h}x{img_w}")
                if feats.ndim != 2 or boxes.shape != (len(feats), 4) or conf.shape != (len(feats),):
                    raise ConfigError(
                        f"{path}: image {img_id!r} has features {feats.shape}, boxes {boxes.shape}, "
                        f"confidence {conf.shape}; expected [R, D], [R, 4], [R]"
                    )
                count = len(feats)
                if max_regions is not None:
                    if not 1 <= count <= max_regions:
                        raise ConfigError(f"{path}: image {img_id!r} has {count} regions; expected 1..{max_regions}")
                    pad = max_regions - count
                    feats = np.concatenate([feats, np.zeros((pad, feats.shape[1]), feats.dtype)])
                    boxes = np.concatenate([boxes, np.zeros((pad, 4), boxes.dtype)])
                    conf = np.concatenate([conf, np.zeros(pad, conf.dtype)])
                if n == 0:
                    r, d = feats.shape
                    chunk = (1, r)
                    f.create_dataset("img_id", (0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(256,))
                    f.create_dataset("features", (0, r, d), maxshape=(None, r, d), dtype="f4", chunks=(1, r, d))
                    f.create_dataset("boxes", (0, r, 4), maxshape=(None, r, 4), dtype="f4", chunks=(*chunk, 4))
                    f.create_dataset("objects_conf", (0, r), maxshape=(None, r), dtype="f4", chunks=chunk)
                    f.create_dataset("img_h", (0,), maxshape=(None,), dtype="i4", chunks=(256,))
                    f.create_dataset("img_w", (0,), maxshape=(None,), dtype="i4", chunks=(256,))
                    if max_regions is not None:
                        f.create_dataset("num_boxes", (0,), maxshape=(None,), dtype="i4", chunks=(256,))
                elif feats.shape != f["features"].shape[1:]:
                    raise ConfigError(
                        f"{path}: image {img_id!r} has features {feats.shape}, "
                        f"earlier images {tuple(f['features'].shape[1:])}"
                    )
                names = ("img_id", "features", "boxes", "objects_conf", "img_h", "img_w")
                for name in names + (("num_boxes",) if max_regions is not None else ()):
                    f[name].resize(n + 1, axis=0)
                if max_regions is not None:
                    f["num_boxes"][n] = count
                f["img_id"][n] = img_id
                f["features"][n] = feats
                # Pixels computed in float64 so only the final store rounds.
                f["boxes"][n] = boxes * np.asarray([img_w, img_h, img_w, img_h], dtype=np.float64)
                f["objects_conf"][n] = conf
                f["img_h"][n] = int(img_h)
                f["img_w"][n] = int(img_w)
                n += 1
            if n == 0:
                raise ConfigError(f"{path}: no images to write")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; a features file is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


# ------------------------------------------------------------------------------------------- detecting

#: Image inputs :class:`RegionDetector` accepts: a file path, a PIL image, or a float ``[3, H, W]`` tensor
#: with values in [0, 1] (torchvision's detector convention; it normalises internally).
ImageInput = str | Path | Image.Image | Tensor

#: Architectures :class:`RegionDetector` builds, with the torchvision weight enum each one uses.
DETECTOR_ARCHS: tuple[str, ...] = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2")


def _torchvision_detection() -> Any:
    try:
        from torchvision.models import detection
    except ImportError as e:  # torchvision is optional: only this class needs it
        raise ImportError(
            "RegionDetector needs torchvision; install it with `pip install vgskit[regions]` "
            "(a torchvision build matching your torch)"
        ) from e
    return detection


def _weights_enum(detection: Any, arch: str) -> Any:
    return {
        "fasterrcnn_resnet50_fpn": detection.FasterRCNN_ResNet50_FPN_Weights,
        "fasterrcnn_resnet50_fpn_v2": detection.FasterRCNN_ResNet50_FPN_V2_Weights,
    }[arch]


def _weights_name(enum: Any, weights: str) -> Any | None:
    """The torchvision weight entry ``weights`` names (``"DEFAULT"``, ``"COCO_V1"`` or ``"Enum.COCO_V1"``)."""
    name = weights.rsplit(".", 1)[-1] if weights.startswith(enum.__name__ + ".") else weights
    return enum.__members__.get(name)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only: a .pth is a pickle, and unpickling an arbitrary file can run code.
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Training checkpoints often wrap the state dict; accept the two usual wrappers.
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise InputFileError(path, f"expected a state dict, found {type(state).__name__}")
    return state


class RegionDetector:
    """Region features of images from torchvision's Faster R-CNN, in the form :class:`RegionFeatureReader` returns.

    Every image yields exactly ``num_regions`` regions: the detector keeps its ``num_regions`` best
    detections with no score threshold (per-class NMS as torchvision does it); an image with fewer
    detections is padded with zero boxes, zero features and confidence 0. Regions are sorted by decreasing
    confidence, boxes are ``x1/w, y1/h, x2/w, y2/h`` of the input image, and features are the box head's
    representation (1024-d) of each kept box. See the module docstring for how these differ from BUTD.

    Args:
        weights: a local weight file (a state dict as ``.safetensors`` or ``.pth``/``.pt``, loaded with
            ``weights_only=True``); a torchvision weight name (``"DEFAULT"``, ``"COCO_V1"``), which
            torchvision downloads into its cache (``torch.hub.get_dir()``) when online; or ``None`` for
            random weights (tests, shape checks).
        arch: ``"fasterrcnn_resnet50_fpn"`` or ``"fasterrcnn_resnet50_fpn_v2"``.
        num_regions: regions per image (BUTD/LXMERT files use 36).
        min_size / max_size: the detector's resize of the shorter / longer side (torchvision defaults).
        device: where the detector runs; results are returned on the CPU.

    Raises:
        MissingWeightsError: ``weights`` is neither an existing file nor a torchvision weight name, or the
            named weights cannot be downloaded. The message says what to download and where.
        InputFileError: the weight file does not hold this architecture's weights.
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        *,
        arch: str = "fasterrcnn_resnet50_fpn",
        num_regions: int = 36,
        min_size: int = 800,
        max_size: int = 1333,
        device: str | torch.device = "cpu",
    ):
        if arch not in DETECTOR_ARCHS:
            raise ConfigError(f"arch must be one of {DETECTOR_ARCHS}, got {arch!r}")
        if isinstance(num_regions, bool) or not isinstance(num_regions, int) or num_regions <= 0:
            raise ConfigError(f"num_regions must be a positive integer, got {num_regions!r}")
        if min_size <= 0 or max_size < min_size:
            raise ConfigError(f"need 0 < min_size <= max_size, got min_size={min_size}, max_size={max_size}")
        detection = _torchvision_detection()
        enum = _weights_enum(detection, arch)
        builder = getattr(detection, arch)
        opts: dict[str, Any] = {
            "min_size": min_size,
            "max_size": max_size,
            # No score threshold and exactly num_regions kept: the fixed-size layout BUTD files use.
            "box_score_thresh": 0.0,
            "box_detections_per_img": num_regions,
        }
        state: dict[str, Tensor] | None = None
        pretrained = None
        if weights is not None:
            named = _weights_name(enum, weights) if isinstance(weights, str) else None
            if named is not None and not Path(weights).is_file():
                pretrained = named
            else:
                path = Path(weights).expanduser()
                if not path.is_file():
                    raise MissingWeightsError(self._missing_message(path, enum))
                state = _read_state_dict(path)
        if pretrained is not None:
            try:
                model = builder(weights=pretrained, **opts)
            except OSError as e:  # URLError is an OSError: offline and not in the cache
                raise MissingWeightsError(
                    f"could not download torchvision weights {enum.__name__}.{pretrained.name} "
                    f"({pretrained.url}): {e}\n" + self._download_hint(enum)
                ) from e
        else:
            # weights_backbone=None too: otherwise torchvision would download ImageNet backbone weights.
            num_classes = 91
            if state is not None and "roi_heads.box_predictor.cls_score.weight" in state:
                num_classes = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
            model = builder(weights=None, weights_backbone=None, num_classes=num_classes, **opts)
            if state is not None:
                self._load(model, state, Path(weights).expanduser(), arch)  # type: ignore[arg-type]
        self.arch = arch
        self.num_regions = num_regions
        self.device = torch.device(device)
        self.model: nn.Module = model.eval().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)

    @staticmethod
    def _download_hint(enum: Any) -> str:
        url = enum.DEFAULT.url
        return (
            f"On a machine with network access download\n    {url}\n"
            f"copy it to this machine and pass its path as `weights`, or put it in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'} and pass the name 'DEFAULT'."
        )

    @classmethod
    def _missing_message(cls, path: Path, enum: Any) -> str:
        names = ", ".join(repr(n) for n in enum.__members__)
        return (
            f"detector weights file {path} not found (nor is it a torchvision weight name: {names}).\n"
            + cls._download_hint(enum)
        )

    @staticmethod
    def _load(model: nn.Module, state: dict[str, Tensor], path: Path, arch: str) -> None:
        result = model.load_state_dict(state, strict=False)
        # torchvision's COCO files come from a model with frozen batch norm, which has no
        # num_batches_tracked buffer; that counter is unused in eval mode, so its absence is harmless.
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        unexpected = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise InputFileError(
                path,
                f"not {arch} weights: {len(missing)} missing key(s) (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[:3]})",
            )

    @property
    def feature_dim(self) -> int:
        """Size of a region feature (1024 for both architectures)."""
        return int(self.model.roi_heads.box_predictor.cls_score.in_features)

    def image_tensor(self, image: ImageInput) -> Tensor:
        """``image`` as the float ``[3, H, W]`` tensor in [0, 1] the detector takes (files via ``load_image``)."""
        if isinstance(image, Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ConfigError(f"image tensors must be [3, H, W], got {tuple(image.shape)}")
            return image.to(self.device, torch.float32)
        if isinstance(image, (str, Path)):
            image = load_image(image)
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).to(self.device)

    @torch.no_grad()
    def __call__(self, images: Sequence[ImageInput]) -> list[RegionFeatures]:
        """Region features of each image, computed as one batch (see the class docstring)."""
        if len(images) == 0:
            return []
        model = self.model
        tensors = [self.image_tensor(im) for im in images]
        # The detector's forward rescales boxes to the input size and drops the features; run its stages
        # here instead so the kept boxes are still in the resized frame the FPN features live in.
        batch, _ = model.transform(tensors)
        fmaps = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, fmaps)
        detections, _ = model.roi_heads(fmaps, proposals, batch.image_sizes)
        kept = [d["boxes"] for d in detections]
        pooled = model.roi_heads.box_roi_pool(fmaps, kept, batch.image_sizes)
        feats = model.roi_heads.box_head(pooled).flatten(1).split([len(b) for b in kept])
        out = []
        for det, boxes, f, (h, w) in zip(detections, kept, feats, batch.image_sizes, strict=True):
            # torchvision returns NMS order already; sort anyway, as the layout promises it.
            order = torch.argsort(det["scores"], descending=True, stable=True)
            k = len(order)
            r = RegionFeatures(
                torch.zeros(self.num_regions, f.shape[1]),
                torch.zeros(self.num_regions, 4),
                torch.zeros(self.num_regions),
            )
            # Normalising in the resized frame equals normalising the original-size boxes: the resize
            # scales each axis by exactly resized/original, the factor torchvision undoes in postprocess.
            scale = torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
            r.features[:k] = f[order].float().cpu()
            r.boxes[:k] = (boxes[order] / scale).clamp(0, 1).float().cpu()
            r.confidence[:k] = det["scores"][order].float().cpu()
            out.append(r)
        return out


def compute_region_features(
    images: Iterable[tuple[str, ImageInput]], detector: RegionDetector, *, batch_size: int = 4
) -> Iterator[tuple[str, RegionFeatures, int, int]]:
    """Run ``detector`` over ``(img_id, image)`` pairs in batches, yielding what :func:`write_region_hdf5` takes.

    Example: ``write_region_hdf5("regions.h5", compute_region_features(pairs, RegionDetector("frcnn.pth")))``.
    """
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    pending: list[tuple[str, Tensor]] = []

    def flush() -> Iterator[tuple[str, RegionFeatures, int, int]]:
        regions = detector([t for _, t in pending])
        for (img_id, t), r in zip(pending, regions, strict=True):
            yield img_id, r, int(t.shape[1]), int(t.shape[2])
        pending.clear()

    for img_id, image in images:
        # Decode up front so the original size is known without relying on the detector's resize.
        pending.append((img_id, detector.image_tensor(image)))
        if len(pending) == batch_size:
            yield from flush()
    if pending:
        yield from flush()
