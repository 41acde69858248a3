"""spoken-scenes: a small visually grounded speech corpus generated locally, with no downloads.

Each image is a rendered scene: a coloured background with 2-4 clothing items taken from Fashion-MNIST
(grayscale 28x28 pictures used as masks and shading, tinted with a colour attribute), each placed in one
cell of a 3x3 grid, so that sizes, colours, positions and spatial relations all exist in the picture.
Each image gets several different captions from a small grammar, and each caption is spoken by a
different synthetic voice (espeak-ng and flite with varied voices, speeds and pitch), stored as
16 kHz mono int16 WAV.

Every caption is generated from structured facts about its scene (mentioned objects with attributes,
relations between them, background colour, object count), and those facts are kept in ``facts.json``
beside the manifest. :func:`ceiling` uses them to compute the best retrieval scores a model could
reach on a split when it only knows what the caption says: a caption that is also true of other images
cannot tell them apart, so its expected recall is capped.

Layout of a corpus folder::

    manifest.jsonl        one Record per spoken caption (see vgskit.data.manifest)
    facts.json            scenes and the structured facts of every caption
    images/<image_id>.png
    wavs/<caption_id>.wav
    corpus.json           config + format version; written last, it marks the corpus complete
"""

from __future__ import annotations

import atexit
import gzip
import json
import logging
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import wave
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
from PIL import Image

from vgskit.data.manifest import Record, write_manifest
from vgskit.errors import ConfigError, VGSKitError
from vgskit.fileio import temp_path_for, write_text_atomic

__all__ = [
    "FORMAT_VERSION",
    "PRESETS",
    "SpokenScenesConfig",
    "caption_true_of",
    "ceiling",
    "ceiling_from_facts",
    "default_cache_dir",
    "generate_spoken_scenes",
    "object_boxes",
    "preset_dir",
    "scene_glyphs",
    "spoken_scenes",
]

log = logging.getLogger(__name__)

# Bump whenever rendering, the grammar or the voices change, so that cached corpora are regenerated.
FORMAT_VERSION = 1
SAMPLE_RATE = 16000
SPLITS = ("train", "val", "test")
# Part of the per-image random seed, so that scenes of different splits never share a random stream.
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}

CLASSES = (
    "t-shirt",
    "trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
# Bright object colours, all readable on every (dark) background below.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (50, 200, 60),
    "blue": (60, 110, 255),
    "yellow": (245, 225, 40),
    "purple": (160, 70, 220),
    "orange": (250, 140, 20),
    "white": (240, 240, 240),
    "pink": (250, 130, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (18, 18, 20),
    "gray": (88, 88, 92),
    "brown": (92, 58, 30),
    "dark blue": (22, 30, 80),
    "dark green": (20, 62, 32),
}
SIZES = ("small", "large")
GRID = 3
# Object side as a fraction of a grid cell; small objects stay large enough to recognise at 64 px.
_SIZE_FRACTION = {"small": 0.66, "large": 0.98}
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}

# (phrase, row constraint, column constraint) per grid cell; None means "any".  Edge cells only
# constrain one axis, because "at the top" is also true of an object in a top corner.
_CELL_PHRASES: dict[tuple[int, int], tuple[str, int | None, int | None]] = {
    (0, 0): ("in the top left corner", 0, 0),
    (0, 1): ("at the top", 0, None),
    (0, 2): ("in the top right corner", 0, 2),
    (1, 0): ("on the left", None, 0),
    (1, 1): ("in the middle", 1, 1),
    (1, 2): ("on the right", None, 2),
    (2, 0): ("in the bottom left corner", 2, 0),
    (2, 1): ("at the bottom", 2, None),
    (2, 2): ("in the bottom right corner", 2, 2),
}
_RELATION_PHRASES = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}

# espeak-ng voices and variants; all produce intelligible English.
_ESPEAK_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan")
_ESPEAK_VARIANTS = ("", "+f1", "+f2", "+f3", "+f4", "+f5", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7")
# flite voices with their share of captions.  The clustergen voices (slt, rms, awb) take ~0.1 s per
# caption, several times espeak-ng, so they get a small share to keep generation fast.
_FLITE_VOICES = {"kal16": 0.10, "kal": 0.03, "slt": 0.02, "rms": 0.015, "awb": 0.015}
_INSTALL_TTS = "install with: apt-get install espeak-ng flite"
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class SpokenScenesConfig:
    """What to generate; the same config (and seed) always gives the same corpus."""

    num_train: int
    num_val: int
    num_test: int
    captions_per_image: int = 5
    image_size: int = 96
    seed: int = 0
    min_objects: int = 2
    max_objects: int = 4

    def validate(self) -> None:
        """Raise ConfigError naming the first value that cannot be used."""
        for name in ("num_train", "num_val", "num_test"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"SpokenScenesConfig.{name} must be an integer >= 0, got {value!r}")
        if self.num_train + self.num_val + self.num_test == 0:
            raise ConfigError(
                "SpokenScenesConfig asks for no images at all (num_train+num_val+num_test == 0)"
            )
        if not isinstance(self.captions_per_image, int) or not 1 <= self.captions_per_image <= len(
            _TEMPLATES
        ):
            raise ConfigError(
                f"SpokenScenesConfig.captions_per_image must be in 1..{len(_TEMPLATES)}, "
                f"got {self.captions_per_image!r}"
            )
        if not isinstance(self.image_size, int) or not 48 <= self.image_size <= 512:
            raise ConfigError(
                f"SpokenScenesConfig.image_size must be an integer in 48..512, got {self.image_size!r}"
            )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"SpokenScenesConfig.seed must be an integer >= 0, got {self.seed!r}")
        if not (isinstance(self.min_objects, int) and isinstance(self.max_objects, int)) or not (
            1 <= self.min_objects <= self.max_objects <= 4
        ):
            raise ConfigError(
                "SpokenScenesConfig needs 1 <= min_objects <= max_objects <= 4, "
                f"got {self.min_objects!r}..{self.max_objects!r}"
            )

    def count(self, split: str) -> int:
        """Number of images of ``split``."""
        return int(getattr(self, f"num_{split}"))


PRESETS: dict[str, SpokenScenesConfig] = {
    # Trains in ~8 minutes on 2 CPU cores; evaluated on its 500-image test split. 3,000 training scenes
    # rather than 2,000: the compact dual encoder overfits 2,000 (at 1,200 steps, test image→speech R@10
    # 84.6 → 90.4 and speech→image 77.3 → 81.7 with 3,000) for ~70 s more generation.
    "demo": SpokenScenesConfig(num_train=3000, num_val=250, num_test=500),
    # For unit tests: generates in a few seconds.
    "tiny": SpokenScenesConfig(num_train=24, num_val=8, num_test=8),
}


def default_cache_dir() -> Path:
    """Folder for generated corpora: ``$VGSKIT_CACHE``, else ``~/.cache/vgskit``."""
    env = os.environ.get("VGSKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vgskit"


def preset_dir(preset: str, cache_dir: str | Path | None = None) -> Path:
    """Folder of a preset corpus: ``<cache>/spoken-scenes-<preset>``."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown spoken-scenes preset {preset!r}; choose one of {sorted(PRESETS)}")
    return Path(cache_dir) if cache_dir is not None else default_cache_dir() / f"spoken-scenes-{preset}"


def spoken_scenes(
    preset: str = "demo",
    cache_dir: str | Path | None = None,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Generate (or reuse) a preset corpus in the cache and return its manifest path."""
    out = preset_dir(preset) if cache_dir is None else Path(cache_dir) / f"spoken-scenes-{preset}"
    return generate_spoken_scenes(out, PRESETS[preset], workers=workers, progress=progress)


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------------


def _fashion_mnist_dir() -> Path:
    env = os.environ.get("VGSKIT_FASHION_MNIST")
    return Path(env).expanduser() if env else Path("/usr/share/datasets/fashion-mnist")


def _load_fashion_mnist(part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of the ``train`` or ``t10k`` part."""
    folder = _fashion_mnist_dir()
    image_name, label_name = _FMNIST_FILES[part]
    paths = (folder / image_name, folder / label_name)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise VGSKitError(
            f"Fashion-MNIST file(s) not found: {', '.join(missing)}. Install them with: "
            "apt-get install dataset-fashion-mnist (or set VGSKIT_FASHION_MNIST to a folder holding "
            "the four *-ubyte.gz files)"
        )
    try:
        with gzip.open(paths[0], "rb") as f:
            raw_images = f.read()
        with gzip.open(paths[1], "rb") as f:
            raw_labels = f.read()
        # idx format: big-endian magic and dimensions, then raw uint8 data.
        n = int.from_bytes(raw_images[4:8], "big")
        images = np.frombuffer(raw_images, dtype=np.uint8, offset=16).reshape(n, 28, 28)
        labels = np.frombuffer(raw_labels, dtype=np.uint8, offset=8)
    except (OSError, ValueError, EOFError) as e:
        raise VGSKitError(f"Fashion-MNIST files in {folder} cannot be read ({e}); reinstall them") from e
    if len(labels) != n:
        raise VGSKitError(f"Fashion-MNIST {part} in {folder}: {n} images but {len(labels)} labels")
    return images, labels


def _instance_pools(part: str, labels: np.ndarray, split: str) -> list[np.ndarray]:
    """Per class, the Fashion-MNIST indices a split may draw from.

    Train scenes use the train part; val and test share the t10k part, split in two halves per class
    so that no picture is seen in both.
    """
    pools = []
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(labels == c)
        if split == "val":
            idx = idx[: len(idx) // 2]
        elif split == "test":
            idx = idx[len(idx) // 2 :]
        pools.append(idx)
    return pools


# --------------------------------------------------------------------------------------------------
# Scenes and captions
# --------------------------------------------------------------------------------------------------


def _sample_scene(rng: np.random.Generator, config: SpokenScenesConfig, pools: list[np.ndarray]) -> dict:
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    # Distinct classes per scene, so that "the dress" always names one object.
    classes = rng.choice(len(CLASSES), size=n, replace=False)
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    colours = list(COLOURS)
    objects = []
    for c, cell in zip(classes, cells, strict=True):
        pool = pools[int(c)]
        objects.append(
            {
                "cls": CLASSES[int(c)],
                "colour": colours[int(rng.integers(len(colours)))],
                "size": SIZES[int(rng.integers(2))],
                "row": int(cell) // GRID,
                "col": int(cell) % GRID,
                "fmnist_index": int(pool[int(rng.integers(len(pool)))]),
                # Offset inside the cell, as a fraction of the free space, so scenes are not all aligned.
                "jitter": [float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1))],
            }
        )
    return {"background": list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))], "objects": objects}


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _relation(a: dict, b: dict, rng: np.random.Generator) -> str:
    """A spatial relation that holds from object a to object b (they never share a cell)."""
    options = []
    if a["col"] != b["col"]:
        options.append("left_of" if a["col"] < b["col"] else "right_of")
    if a["row"] != b["row"]:
        options.append("above" if a["row"] < b["row"] else "below")
    return options[int(rng.integers(len(options)))]


class _Builder:
    """Accumulates a caption's mentions and facts while the text is being written."""

    def __init__(self, scene: dict, rng: np.random.Generator, p_colour: float, p_size: float):
        self.scene = scene
        self.rng = rng
        self.p_colour = p_colour
        self.p_size = p_size
        self.mentions: list[dict] = []
        self.relations: list[list[Any]] = []
        self.background: str | None = None
        self.count: int | None = None

    def mention(self, obj: dict, *, position: bool = False, colour: bool | None = None) -> str:
        """Noun phrase for obj ("a small red dress [in the middle]"), recording what it states."""
        use_colour = bool(self.rng.random() < self.p_colour) if colour is None else colour
        use_size = bool(self.rng.random() < self.p_size)
        fact: dict[str, Any] = {"cls": obj["cls"], "colour": None, "size": None, "row": None, "col": None}
        words = []
        if use_size:
            words.append(obj["size"])
            fact["size"] = obj["size"]
        if use_colour:
            words.append(obj["colour"])
            fact["colour"] = obj["colour"]
        if obj["cls"] == "trousers":
            # "a red trousers" is ungrammatical; English counts trousers in pairs.
            text = "a pair of " + " ".join([*words, "trousers"])
        else:
            text = _article(" ".join([*words, obj["cls"]]))
        if position:
            phrase, row, col = _CELL_PHRASES[(obj["row"], obj["col"])]
            text += " " + phrase
            fact["row"], fact["col"] = row, col
        self.mentions.append(fact)
        return text

    def relate(self, i: int, j: int, rel: str) -> str:
        self.relations.append([i, rel, j])
        return _RELATION_PHRASES[rel]

    def on_background(self) -> str:
        self.background = self.scene["background"]
        return f"on a {self.background} background"

    def facts(self) -> dict:
        return {
            "mentions": self.mentions,
            "relations": self.relations,
            "background": self.background,
            "count": self.count,
        }


def _join(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _pick_objects(b: _Builder, most: int = 3) -> list[dict]:
    """The objects a caption talks about: all of them, or ``most`` of four so utterances stay short."""
    objs = list(b.scene["objects"])
    order = b.rng.permutation(len(objs))
    return [objs[int(i)] for i in order[: min(most, len(objs))]]


def _t_list(b: _Builder) -> str:
    objs = _pick_objects(b)
    intro = ["", "there is ", "a picture of ", "i see "][int(b.rng.integers(4))]
    text = intro + _join([b.mention(o) for o in objs])
    if b.rng.random() < 0.4:
        text += " " + b.on_background()
    return text


def _t_relation(b: _Builder) -> str:
    objs = _pick_objects(b)
    first = b.mention(objs[0])
    rel = b.relate(0, 1, _relation(objs[0], objs[1], b.rng))
    text = f"{first} {rel} {b.mention(objs[1])}"
    if len(objs) > 2:
        text += " and " + b.mention(objs[2])
    return text


def _t_is_relation(b: _Builder) -> str:
    objs = _pick_objects(b)
    first = b.mention(objs[0], colour=True)
    rel = b.relate(0, 1, _relation(objs[0], objs[1], b.rng))
    text = f"{first} is {rel} {b.mention(objs[1], colour=True)}"
    if len(objs) > 2:
        text += " and " + b.mention(objs[2]) + " is " + b.relate(2, 0, _relation(objs[2], objs[0], b.rng))
        text += " it"
    return text


def _t_positions(b: _Builder) -> str:
    objs = _pick_objects(b, most=2 if len(b.scene["objects"]) == 4 else 3)
    parts = [b.mention(o, position=bool(k < 2)) for k, o in enumerate(objs)]
    return _join(parts)


def _t_count(b: _Builder) -> str:
    n = len(b.scene["objects"])
    b.count = n
    objs = _pick_objects(b)
    noun = "things" if b.rng.random() < 0.5 else "objects"
    head = f"{_NUMBER_WORDS[n]} {noun}" if n > 1 else f"{_NUMBER_WORDS[n]} thing"
    text = f"{head} {b.on_background()}" if b.rng.random() < 0.5 else head
    # When only three of four objects are named, say so, so the listing does not read as complete.
    lead = ", including " if len(objs) < n else ", "
    return text + lead + _join([b.mention(o) for o in objs])


def _t_background_first(b: _Builder) -> str:
    objs = _pick_objects(b)
    bg = b.on_background()
    first = b.mention(objs[0])
    if len(objs) > 1:
        rel = b.relate(0, 1, _relation(objs[0], objs[1], b.rng))
        text = f"{bg}, {first} {rel} {b.mention(objs[1])}"
    else:
        text = f"{bg}, {first}"
    if len(objs) > 2:
        text += " and " + b.mention(objs[2])
    return text


_TEMPLATES = (_t_list, _t_relation, _t_is_relation, _t_positions, _t_count, _t_background_first)


def _make_captions(scene: dict, rng: np.random.Generator, n: int) -> list[tuple[str, dict]]:
    """``n`` different captions of one scene, each with the structured facts it states."""
    out: list[tuple[str, dict]] = []
    if len(scene["objects"]) < 2:
        # Relation templates need two objects; fall back to the list-like ones.
        templates = [_t_list, _t_positions, _t_count]
    else:
        templates = list(_TEMPLATES)
    order = [templates[int(i)] for i in rng.permutation(len(templates))]
    texts: set[str] = set()
    attempts = 0
    while len(out) < n:
        template = order[len(out) % len(order)] if attempts < 4 * n else order[int(rng.integers(len(order)))]
        attempts += 1
        b = _Builder(scene, rng, p_colour=0.9, p_size=0.3)
        text = template(b)
        if text in texts and attempts < 50 * n:
            continue
        texts.add(text)
        out.append((text, b.facts()))
    return out


def _mention_matches(m: dict, obj: dict) -> bool:
    return (
        m["cls"] == obj["cls"]
        and (m.get("colour") is None or m["colour"] == obj["colour"])
        and (m.get("size") is None or m["size"] == obj["size"])
        and (m.get("row") is None or m["row"] == obj["row"])
        and (m.get("col") is None or m["col"] == obj["col"])
    )


def _relation_holds(a: dict, rel: str, b: dict) -> bool:
    if rel == "left_of":
        return a["col"] < b["col"]
    if rel == "right_of":
        return a["col"] > b["col"]
    if rel == "above":
        return a["row"] < b["row"]
    if rel == "below":
        return a["row"] > b["row"]
    raise ValueError(f"unknown relation {rel!r}")


def caption_true_of(facts: dict, scene: dict) -> bool:
    """Whether every fact of a caption holds in a scene.

    Mentions must be matched to *different* objects of the scene, with the relations holding under that
    matching; the search tries all assignments (at most 4 mentions of 4 objects).
    """
    if facts.get("background") is not None and facts["background"] != scene["background"]:
        return False
    objects = scene["objects"]
    if facts.get("count") is not None and facts["count"] != len(objects):
        return False
    mentions = facts["mentions"]
    candidates = [[k for k, o in enumerate(objects) if _mention_matches(m, o)] for m in mentions]
    if any(not c for c in candidates):
        return False
    relations = facts.get("relations", [])

    def search(i: int, used: list[int]) -> bool:
        if i == len(mentions):
            return all(_relation_holds(objects[used[a]], rel, objects[used[c]]) for a, rel, c in relations)
        return any(search(i + 1, [*used, k]) for k in candidates[i] if k not in used)

    return search(0, [])


# --------------------------------------------------------------------------------------------------
# Voices
# --------------------------------------------------------------------------------------------------


def _pick_voice(rng: np.random.Generator) -> dict:
    """A TTS voice with speed and pitch; the ``speaker`` string names all of it."""
    u = float(rng.random())
    acc = 0.0
    for voice, share in _FLITE_VOICES.items():
        acc += share
        if u < acc:
            stretch = round(float(rng.uniform(0.85, 1.15)), 2)
            return {
                "engine": "flite",
                "voice": voice,
                "stretch": stretch,
                "speaker": f"flite:{voice}:d{stretch}",
            }
    voice = _ESPEAK_VOICES[int(rng.integers(len(_ESPEAK_VOICES)))]
    voice += _ESPEAK_VARIANTS[int(rng.integers(len(_ESPEAK_VARIANTS)))]
    speed = int(rng.integers(150, 201))
    pitch = int(rng.integers(25, 76))
    return {
        "engine": "espeak",
        "voice": voice,
        "speed": speed,
        "pitch": pitch,
        "speaker": f"espeak:{voice}:s{speed}:p{pitch}",
    }


def _check_tts() -> None:
    missing = [exe for exe in ("espeak-ng", "flite") if shutil.which(exe) is None]
    if missing:
        raise VGSKitError(f"text-to-speech program(s) not found: {', '.join(missing)}; {_INSTALL_TTS}")


# espeak-ng through its shared library, with the audio of the espeak-ng program.
#
# The library keeps state from one synthesis to the next that its API cannot reset (static variables
# of the wave generator and of prosody, untouched even by espeak_ng_Initialize), so a second caption
# synthesised in the same initialised process differs slightly from what the program writes.  The
# server below therefore initialises the library once and then forks one child per caption: each
# child starts from exactly the state the espeak-ng program has after its own start-up, and the
# initialisation (reading phoneme data, voices) is not repeated.  The server is a small separate
# Python process with no threads, so forking it is cheap and safe whatever the caller has loaded.
#
# It does what espeak-ng's main() does for `espeak-ng -v VOICE -s SPEED -p PITCH -w FILE -- TEXT`:
# synchronous output with the default buffer, the voice by name or else by language (with the
# variant after "+"), rate and pitch set after the voice, and espeak_Synth with the program's flags
# espeakCHARS_AUTO | espeakPHONEMES | espeakENDPAUSE; the samples are the int16 the program writes.
_ESPEAK_LIBRARY = "libespeak-ng.so.1"
_ESPEAK_SERVER_SOURCE = r"""
import ctypes, json, os, struct, sys

SYNCHRONOUS, POS_CHARACTER, RATE, PITCH = 0x0001, 1, 1, 3
CHARS_AUTO, PHONEMES, ENDPAUSE = 0, 0x100, 0x1000


class Voice(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_char_p),
                ("identifier", ctypes.c_char_p), ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte),
                ("variant", ctypes.c_ubyte), ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int),
                ("spare", ctypes.c_void_p)]


def read_exact(fd, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def reply(status, rate, payload=b""):
    write_all(1, struct.pack("<iiQ", status, rate, len(payload)) + payload)


def speak(lib, request):
    voice = request["voice"].encode()
    status = lib.espeak_ng_SetVoiceByName(voice)
    if status != 0:
        selector = Voice(languages=voice)
        status = lib.espeak_ng_SetVoiceByProperties(ctypes.byref(selector))
    if status != 0:
        return status
    lib.espeak_ng_SetParameter(RATE, request["speed"], 0)
    lib.espeak_ng_SetParameter(PITCH, request["pitch"], 0)
    text = request["text"].encode()
    status = lib.espeak_ng_Synthesize(text, len(text) + 1, 0, POS_CHARACTER, 0,
                                      CHARS_AUTO | PHONEMES | ENDPAUSE, None, None)
    return status or lib.espeak_ng_Synchronize()


def main():
    try:
        lib = ctypes.CDLL(sys.argv[1])
        lib.espeak_ng_Synthesize.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                             ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_ng_InitializePath(None)
        status = lib.espeak_ng_Initialize(ctypes.byref(ctypes.c_void_p()))
        if status == 0:
            status = lib.espeak_ng_InitializeOutput(SYNCHRONOUS, 0, None)
    except (OSError, AttributeError):
        status = -1
    if status != 0:
        reply(status or -1, 0)
        return
    # Reading the voice list and the English dictionary once here spares every child ~2.5 ms; both
    # are data the program would read the same way, and the children's audio is unchanged.
    lib.espeak_ListVoices.restype = ctypes.c_void_p
    lib.espeak_ListVoices(None)
    lib.espeak_ng_SetVoiceByName(b"en")
    rate = lib.espeak_ng_GetSampleRate()
    chunks = []

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
    def on_samples(wav, n, events):
        if wav and n > 0:
            chunks.append(ctypes.string_at(wav, 2 * n))
        return 0

    lib.espeak_SetSynthCallback(on_samples)
    reply(0, rate)
    while True:
        try:
            request = read_exact(0, struct.unpack("<I", read_exact(0, 4))[0])
        except EOFError:
            return
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                os.close(r)
                if speak(lib, json.loads(request)) == 0:
                    write_all(w, b"".join(chunks))
                    code = 0
                else:
                    code = 2
            finally:
                os._exit(code)
        os.close(w)
        parts = []
        while True:
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            parts.append(chunk)
        os.close(r)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        reply(code or 0, rate, b"".join(parts) if code == 0 else b"")


main()
"""


class _EspeakServerError(Exception):
    pass


class _EspeakServer:
    """A process that speaks captions with libespeak-ng exactly as the espeak-ng program does."""

    def __init__(self, library: str) -> None:
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _ESPEAK_SERVER_SOURCE, library],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )
        try:
            status, self.rate, _ = self._reply()
        except _EspeakServerError:
            self.close()
            raise
        if status != 0:
            self.close()
            raise _EspeakServerError(f"cannot initialise {library} (status {status})")

    def _read(self, n: int) -> bytes:
        assert self._proc.stdout is not None
        buf = bytearray()
        while len(buf) < n:
            chunk = self._proc.stdout.read(n - len(buf))
            if not chunk:
                raise _EspeakServerError(f"espeak-ng server exited (code {self._proc.poll()})")
            buf += chunk
        return bytes(buf)

    def _reply(self) -> tuple[int, int, bytes]:
        status, rate, size = struct.unpack("<iiQ", self._read(16))
        return status, rate, self._read(size)

    def synthesise(self, text: str, voice: str, speed: int, pitch: int) -> np.ndarray | None:
        """Float samples at ``self.rate``, or None when espeak-ng refused this caption."""
        request = json.dumps({"text": text, "voice": voice, "speed": speed, "pitch": pitch}).encode()
        with self._lock:
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write(struct.pack("<I", len(request)) + request)
            except OSError as e:
                raise _EspeakServerError(f"espeak-ng server unreachable ({e})") from e
            status, _, payload = self._reply()
        if status != 0:
            return None
        # As soundfile reads the program's 16-bit WAV as float32: each sample divided by 32768.
        return np.frombuffer(payload, dtype="<i2").astype(np.float32) / np.float32(32768.0)

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


# One server per process, made on first use.  Keyed by pid so that a forked child never shares its
# parent's pipes; None records that the library is unusable here, so the program is used instead.
_espeak_servers: dict[int, _EspeakServer | None] = {}
_espeak_servers_lock = threading.Lock()


def _espeak_server() -> _EspeakServer | None:
    pid = os.getpid()
    with _espeak_servers_lock:
        if pid not in _espeak_servers:
            try:
                _espeak_servers[pid] = _EspeakServer(_ESPEAK_LIBRARY)
            except (OSError, _EspeakServerError) as e:
                log.debug("espeak-ng library unavailable, using the espeak-ng program: %s", e)
                _espeak_servers[pid] = None
        return _espeak_servers[pid]


def _close_espeak_server(disable: bool = False) -> None:
    """Stop this process's server (if any); the next espeak caption starts a new one unless ``disable``."""
    with _espeak_servers_lock:
        server = _espeak_servers.pop(os.getpid(), None)
        if disable:
            _espeak_servers[os.getpid()] = None
    if server is not None:
        server.close()


atexit.register(_close_espeak_server)


def _synthesise(text: str, voice: dict, tmp_wav: Path) -> tuple[np.ndarray, int]:
    """Speak ``text``; return float samples (mono) and their sample rate.

    espeak-ng voices go through the library server when it is available, which gives the same
    samples as the program; otherwise (and for flite) the TTS program writes ``tmp_wav``.
    """
    if voice["engine"] == "espeak":
        server = _espeak_server()
        if server is not None:
            try:
                samples = server.synthesise(text, voice["voice"], int(voice["speed"]), int(voice["pitch"]))
            except _EspeakServerError as e:
                log.debug("espeak-ng server failed, using the espeak-ng program: %s", e)
                _close_espeak_server(disable=True)
                samples = None
            if samples is not None:
                return samples, server.rate
        # Writing to a file (-w) rather than --stdout: the streamed header has a bogus length.
        cmd = ["espeak-ng", "-v", voice["voice"], "-s", str(voice["speed"]), "-p", str(voice["pitch"])]
        cmd += ["-w", str(tmp_wav), "--", text]
    else:
        cmd = ["flite", "-voice", voice["voice"], "--setf", f"duration_stretch={voice['stretch']}"]
        cmd += ["-t", text, "-o", str(tmp_wav)]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    except FileNotFoundError as e:
        raise VGSKitError(f"{cmd[0]} not found; {_INSTALL_TTS}") from e
    if proc.returncode != 0 or not tmp_wav.is_file():
        err = proc.stderr.decode(errors="replace").strip()[-500:]
        raise VGSKitError(f"{' '.join(cmd[:-1])} {text!r} failed (exit {proc.returncode}): {err}")
    samples, sr = sf.read(str(tmp_wav), dtype="float32", always_2d=True)
    return samples.mean(axis=1), int(sr)


def _to_16k_trimmed(samples: np.ndarray, sr: int) -> np.ndarray:
    """Resample to 16 kHz and trim silence beyond 0.1 s at both ends (TTS pads the end generously)."""
    if sr != SAMPLE_RATE:
        samples = soxr.resample(samples, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)
    loud = np.flatnonzero(np.abs(samples) > 0.01)
    if loud.size:
        pad = SAMPLE_RATE // 10
        samples = samples[max(0, int(loud[0]) - pad) : int(loud[-1]) + pad]
    return np.clip(np.round(samples * 32767.0), -32768, 32767).astype(np.int16)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _placement(obj: dict, size: int) -> tuple[int, int, int]:
    """Top-left corner ``(x0, y0)`` and side of an object's square in a ``size``-pixel image."""
    cell = size / GRID
    side = max(8, int(round(cell * _SIZE_FRACTION[obj["size"]])))
    free = cell - side
    x0 = int(round(obj["col"] * cell + free / 2 + obj["jitter"][0] * free / 2))
    y0 = int(round(obj["row"] * cell + free / 2 + obj["jitter"][1] * free / 2))
    return min(max(x0, 0), size - side), min(max(y0, 0), size - side), side


def _glyph_picture(glyph: np.ndarray, side: int) -> np.ndarray:
    """A Fashion-MNIST picture resized to ``side`` pixels, as intensities in [0, 1]."""
    picture = np.asarray(Image.fromarray(glyph).resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
    return np.clip(picture / 255.0, 0.0, 1.0)


def _glyph_alpha(picture: np.ndarray) -> np.ndarray:
    # Intensity is both the mask (alpha) and the shading, so fabric texture stays visible.
    return np.clip(picture * 3.0, 0.0, 1.0)


def object_boxes(scene: dict, size: int, glyphs: Sequence[np.ndarray] | None = None,
                 alpha_threshold: float = 0.5) -> np.ndarray:
    """Pixel boxes ``[n_objects, 4]`` (``x1, y1, x2, y2``, end exclusive) of a scene's objects, in scene order.

    They come from the same placement the renderer uses, so they are where the objects are drawn. With the
    objects' ``glyphs`` (their Fashion-MNIST pictures) each box is tightened to the pixels the object covers
    with opacity ``>= alpha_threshold``, as a detector's box would be; without them it is the object's square.
    """
    boxes = np.zeros((len(scene["objects"]), 4), dtype=np.float64)
    for i, obj in enumerate(scene["objects"]):
        x0, y0, side = _placement(obj, size)
        box = [x0, y0, x0 + side, y0 + side]
        if glyphs is not None:
            ys, xs = np.nonzero(_glyph_alpha(_glyph_picture(glyphs[i], side)) >= alpha_threshold)
            if len(xs):  # a blank picture (none in Fashion-MNIST) keeps its square
                box = [x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1]
        boxes[i] = box
    return boxes


def scene_glyphs(scenes: Sequence[dict]) -> list[list[np.ndarray]]:
    """The Fashion-MNIST pictures of each scene's objects (the part each scene drew from)."""
    parts: dict[str, np.ndarray] = {}
    out = []
    for scene in scenes:
        part = scene["fmnist_part"]
        if part not in parts:
            parts[part] = _load_fashion_mnist(part)[0]
        out.append([parts[part][o["fmnist_index"]] for o in scene["objects"]])
    return out


def _render(scene: dict, glyphs: Sequence[np.ndarray], size: int, rng_seed: Sequence[int]) -> Image.Image:
    """Draw a scene: background with a soft gradient and grain, then each tinted Fashion-MNIST picture."""
    rng = np.random.default_rng(list(rng_seed))
    base = np.array(BACKGROUNDS[scene["background"]], dtype=np.float32)
    # A vertical light gradient and grain make backgrounds look less synthetic without hiding objects.
    ramp = np.linspace(1.15, 0.85, size, dtype=np.float32)[:, None, None]
    canvas = base[None, None, :] * ramp + rng.normal(0.0, 6.0, (size, size, 1)).astype(np.float32)
    canvas = np.broadcast_to(canvas, (size, size, 3)).copy()
    for obj, glyph in zip(scene["objects"], glyphs, strict=True):
        x0, y0, side = _placement(obj, size)
        picture = _glyph_picture(glyph, side)
        alpha = _glyph_alpha(picture)[..., None]
        # A high floor keeps dark Fashion-MNIST pictures clearly coloured instead of near-invisible.
        shade = (0.5 + 0.5 * picture)[..., None]
        colour = np.array(COLOURS[obj["colour"]], dtype=np.float32)
        region = canvas[y0 : y0 + side, x0 : x0 + side]
        canvas[y0 : y0 + side, x0 : x0 + side] = region * (1 - alpha) + colour * shade * alpha
    return Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8), "RGB")


def _atomic_save_png(image: Image.Image, path: Path) -> None:
    tmp = temp_path_for(path)
    image.save(tmp, format="PNG")
    tmp.replace(path)


def _atomic_save_wav(samples: np.ndarray, path: Path) -> None:
    # The stdlib writer is about twice as fast as libsndfile for this plain 16-bit PCM case.
    tmp = temp_path_for(path)
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(samples.astype("<i2").tobytes())
    tmp.replace(path)


def _work(task: dict) -> int:
    """Write one image and its captions' WAVs (whichever are missing); runs in a worker process."""
    out = Path(task["out_dir"])
    done = 0
    image_path = out / task["image"]
    if task["force"] or not image_path.is_file():
        image = _render(task["scene"], task["glyphs"], task["image_size"], task["render_seed"])
        _atomic_save_png(image, image_path)
        done += 1
    with tempfile.TemporaryDirectory(prefix="vgskit-tts-") as tmp:
        for cap in task["captions"]:
            wav_path = out / cap["audio"]
            if not task["force"] and wav_path.is_file():
                continue
            samples, sr = _synthesise(cap["text"], cap["voice"], Path(tmp) / "tts.wav")
            _atomic_save_wav(_to_16k_trimmed(samples, sr), wav_path)
            done += 1
    return done


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def _plan(config: SpokenScenesConfig) -> tuple[dict[str, dict], dict[str, dict], list[dict]]:
    """Scenes, captions (with facts and voices) and per-image work items, all from the seed alone."""
    scenes: dict[str, dict] = {}
    captions: dict[str, dict] = {}
    items: list[dict] = []
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in SPLITS:
        n = config.count(split)
        if n == 0:
            continue
        part = "train" if split == "train" else "t10k"
        if part not in parts:
            parts[part] = _load_fashion_mnist(part)
        images, labels = parts[part]
        pools = _instance_pools(part, labels, split)
        for idx in range(n):
            image_id = f"{split}-{idx:05d}"
            rng = np.random.default_rng([config.seed, _SPLIT_CODE[split], idx])
            scene = _sample_scene(rng, config, pools)
            scene["split"] = split
            scene["fmnist_part"] = part
            scenes[image_id] = scene
            caps = []
            for k, (text, facts) in enumerate(_make_captions(scene, rng, config.captions_per_image)):
                caption_id = f"{image_id}-{k}"
                voice = _pick_voice(rng)
                captions[caption_id] = {"image_id": image_id, "split": split, "text": text, **facts}
                caps.append(
                    {
                        "caption_id": caption_id,
                        "audio": f"wavs/{caption_id}.wav",
                        "text": text,
                        "voice": voice,
                        "speaker": voice["speaker"],
                    }
                )
            items.append(
                {
                    "image_id": image_id,
                    "split": split,
                    "image": f"images/{image_id}.png",
                    "scene": scene,
                    "glyphs": [images[o["fmnist_index"]] for o in scene["objects"]],
                    "render_seed": [config.seed, _SPLIT_CODE[split], idx, 7],
                    "captions": caps,
                }
            )
    return scenes, captions, items


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _atomic_write_json(data: dict, path: Path) -> None:
    write_text_atomic(path, json.dumps(data, ensure_ascii=False))


def _marker(config: SpokenScenesConfig) -> dict:
    return {"corpus": "spoken-scenes", "format_version": FORMAT_VERSION, "config": asdict(config)}


def _all_files_exist(out_dir: Path, manifest: Path) -> bool:
    try:
        with open(manifest, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if not (out_dir / rec["audio"]).is_file() or not (out_dir / rec["image"]).is_file():
                    return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def generate_spoken_scenes(
    out_dir: str | Path,
    config: SpokenScenesConfig,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Generate the spoken-scenes corpus into ``out_dir`` and return ``out_dir/manifest.jsonl``.

    Reuses a complete corpus made with the same config (``corpus.json`` matches and every file listed in
    the manifest exists). A folder left by an interrupted run keeps the files it finished (each is
    written under a temporary name and renamed, so an existing file is a complete file) and only the
    missing ones are made; a folder made with a different config, or with no marker at all, is
    regenerated entirely.

    One process generates a folder at a time (an advisory lock on ``out_dir/.lock``): another process asking
    for the same corpus, e.g. a second ``vgskit demo`` started meanwhile, waits and then reuses it.
    """
    config.validate()
    out = Path(out_dir)
    manifest = out / "manifest.jsonl"
    marker_path = out / "corpus.json"
    wanted = _marker(config)
    if _read_json(marker_path) == wanted and _all_files_exist(out, manifest):
        return manifest
    # Fail before any work (or wait) when a dependency is missing.
    _check_tts()
    with corpus_lock(out, progress):
        if _read_json(marker_path) == wanted and _all_files_exist(out, manifest):
            return manifest  # made by the process we waited for
        return _generate(out, config, workers, progress)


@contextmanager
def corpus_lock(out: Path, progress: bool) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``out/.lock`` (waiting for another holder, with a message)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks; concurrent runs still only write whole files
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"{out}: another process is generating this corpus; waiting for it", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _generate(out: Path, config: SpokenScenesConfig, workers: int | None, progress: bool) -> Path:
    """The work of :func:`generate_spoken_scenes`, under its lock."""
    manifest = out / "manifest.jsonl"
    marker_path = out / "corpus.json"
    wanted = _marker(config)
    scenes, captions, items = _plan(config)

    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    (out / "wavs").mkdir(exist_ok=True)
    # The in-progress marker says which config the files on disk belong to, so that a resumed run only
    # keeps files made for the same config.
    progress_path = out / "corpus.partial.json"
    previous = _read_json(marker_path) or _read_json(progress_path)
    force = previous != wanted
    marker_path.unlink(missing_ok=True)
    _atomic_write_json(wanted, progress_path)

    tasks = [
        {
            "out_dir": str(out),
            "force": force,
            "image_size": config.image_size,
            **{k: item[k] for k in ("image", "scene", "glyphs", "render_seed", "captions")},
        }
        for item in items
    ]
    _run_tasks(tasks, workers, progress)

    records = [
        Record(
            caption_id=cap["caption_id"],
            audio=cap["audio"],
            image=item["image"],
            image_id=item["image_id"],
            split=item["split"],
            text=cap["text"],
            speaker=cap["speaker"],
        )
        for item in items
        for cap in item["captions"]
    ]
    write_manifest(records, manifest)
    _atomic_write_json(
        {"format_version": FORMAT_VERSION, "scenes": scenes, "captions": captions}, out / "facts.json"
    )
    # Written last: its presence means every file above is complete.
    _atomic_write_json(wanted, marker_path)
    progress_path.unlink(missing_ok=True)
    return manifest


def _run_tasks(tasks: list[dict], workers: int | None, progress: bool) -> None:
    from tqdm import tqdm

    n_workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    bar = tqdm(total=len(tasks), desc="spoken-scenes", unit="image", disable=not progress)
    try:
        if n_workers == 1 or len(tasks) <= 1:
            for task in tasks:
                _work(task)
                bar.update(1)
            return
        import multiprocessing as mp

        # Small chunks keep the progress bar live; each task is ~50 ms of TTS so overhead is negligible.
        with mp.get_context("spawn").Pool(n_workers) as pool:
            for _ in pool.imap_unordered(_work, tasks, chunksize=4):
                bar.update(1)
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------------
# Oracle ceiling
# --------------------------------------------------------------------------------------------------


def _recall_hypergeometric(n: int, g: int, k: int) -> float:
    """P(at least one of g gold items is in the top k of n items ranked uniformly at random)."""
    if g <= 0:
        return 0.0
    if k >= n - g + 1:
        return 1.0
    p_none = 1.0
    for t in range(k):
        p_none *= (n - g - t) / (n - t)
    return 1.0 - p_none


def ceiling_from_facts(
    scenes: dict[str, dict], captions: dict[str, dict], split: str, ks: Iterable[int] = (1, 5, 10)
) -> dict:
    """Oracle retrieval ceiling of one split, in percent.

    A model that knows exactly what each caption states, and nothing more, cannot separate images that the
    caption is equally true of:

    * speech->image: a caption true of ``n`` images of the split (its own included) puts its own image at
      a uniformly random rank among those ``n``, so the expected R@K is ``min(1, K/n)``, averaged over
      captions.
    * image->speech: an image is described by every caption true of it (``n`` of the split's captions, its
      ``g`` own captions among them); ranked at random, at least one own caption is in the top K with
      probability ``1 - C(n-g, K) / C(n, K)``, averaged over images.

    Both are exact expectations, not estimates. ``scenes`` maps image_id to a scene (``background``,
    ``objects`` with ``cls``/``colour``/``size``/``row``/``col``, ``split``); ``captions`` maps
    caption_id to facts (``image_id``, ``mentions``, ``relations``, ``background``, ``count``).
    """
    ks = tuple(ks)
    image_ids = sorted(i for i, s in scenes.items() if s.get("split") == split)
    caption_ids = sorted(c for c, f in captions.items() if f["image_id"] in set(image_ids))
    if not image_ids or not caption_ids:
        raise VGSKitError(f"split {split!r} has no images or no captions to compute a ceiling on")
    # Inverted index: class -> images containing it; every mention names a class, so a caption can only
    # be true of images in the intersection.
    by_class: dict[str, set[str]] = {}
    for i in image_ids:
        for o in scenes[i]["objects"]:
            by_class.setdefault(o["cls"], set()).add(i)
    all_images = set(image_ids)
    own_count: dict[str, int] = dict.fromkeys(image_ids, 0)
    true_count: dict[str, int] = dict.fromkeys(image_ids, 0)
    s2i = dict.fromkeys(ks, 0.0)
    unique = 0
    n_consistent_total = 0
    for c in caption_ids:
        facts = captions[c]
        candidates = set(all_images)
        for m in facts["mentions"]:
            candidates &= by_class.get(m["cls"], set())
        consistent = [i for i in candidates if caption_true_of(facts, scenes[i])]
        gold = facts["image_id"]
        if gold not in consistent:
            raise VGSKitError(f"caption {c} is not true of its own image {gold}: {facts.get('text')!r}")
        n = len(consistent)
        n_consistent_total += n
        unique += n == 1
        for k in ks:
            s2i[k] += min(1.0, k / n)
        own_count[gold] += 1
        for i in consistent:
            true_count[i] += 1
    i2s = dict.fromkeys(ks, 0.0)
    for i in image_ids:
        for k in ks:
            i2s[k] += _recall_hypergeometric(true_count[i], own_count[i], k)
    n_caps, n_imgs = len(caption_ids), len(image_ids)
    texts = [captions[c].get("text") for c in caption_ids]
    return {
        "split": split,
        "num_images": n_imgs,
        "num_captions": n_caps,
        "speech_to_image": {f"R@{k}": 100.0 * s2i[k] / n_caps for k in ks},
        "image_to_speech": {f"R@{k}": 100.0 * i2s[k] / n_imgs for k in ks},
        # Share of captions true of their own image only (a perfect model retrieves it at rank 1).
        "unique_caption_fraction": unique / n_caps,
        "mean_consistent_images": n_consistent_total / n_caps,
        "distinct_text_fraction": len(set(texts)) / n_caps if all(t is not None for t in texts) else math.nan,
    }


def ceiling(out_dir: str | Path, split: str = "test", ks: Iterable[int] = (1, 5, 10)) -> dict:
    """Oracle ceiling of a generated corpus's split, from its ``facts.json`` (see :func:`ceiling_from_facts`)."""
    path = Path(out_dir) / "facts.json"
    data = _read_json(path)
    if data is None or "scenes" not in data or "captions" not in data:
        raise VGSKitError(f"{path} is missing or unreadable; generate the corpus first")
    return ceiling_from_facts(data["scenes"], data["captions"], split, ks)
