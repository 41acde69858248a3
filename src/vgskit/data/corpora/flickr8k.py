"""Flickr8k Audio Caption Corpus (FACC): 40,000 spoken captions of the 8,000 Flickr8k images.

Layout as distributed (the folders may sit anywhere up to three levels below ``--root``)::

    flickr_audio/wavs/<img>_<n>.wav          n = 0..4
    flickr_audio/wav2capt.txt                "<img>_<n>.wav <img>.jpg #<n>"
    flickr_audio/wav2spk.txt                 "<img>_<n>.wav <speaker>"       (optional: speakers)
    Flicker8k_Dataset/<img>.jpg              (the misspelt official name; "Images/" in re-packs)
    Flickr_8k.{train,dev,test}Images.txt     one "<img>.jpg" per line: 6,000 / 1,000 / 1,000
    Flickr8k.token.txt                       "<img>.jpg#<n>\\t<text>"        (optional: transcripts)

Instead of the three split files, Karpathy's ``dataset_flickr8k.json`` (``images[].filename``, ``.split`` in
train/val/test, ``.sentences[].raw``) may be used; its ``val`` is the official ``dev`` list and is named ``dev``
here so both sources give the same manifest. Splits: ``train`` / ``dev`` / ``test``. ``caption_id`` is the wav
stem, ``image_id`` the image file stem.
"""

from __future__ import annotations

from pathlib import Path

from vgskit.data.corpora._common import (
    ManifestBuilder,
    PrepareError,
    as_path,
    decimal,
    find_dir,
    find_file,
    find_optional,
    get_str,
    load_json,
    read_lines,
    require,
    require_entries,
)

SPLITS = ("train", "dev", "test")
SPLIT_FILES = {s: f"Flickr_8k.{s}Images.txt" for s in SPLITS}
TEXT_DIRS = ("Flickr8k_text", "Flickr8k_text_data", "text")
IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images")
KARPATHY_SPLIT = {"train": "train", "val": "dev", "test": "test"}


def _official_splits(root: Path) -> dict[str, str] | None:
    paths = {s: find_optional(root, [name], subdirs=TEXT_DIRS) for s, name in SPLIT_FILES.items()}
    if all(p is None for p in paths.values()):
        return None
    absent = [SPLIT_FILES[s] for s, p in paths.items() if p is None]
    if absent:
        raise PrepareError(f"Flickr8k split file(s) {', '.join(absent)} not found next to the others under {root}")
    split_of: dict[str, str] = {}
    for split, path in paths.items():
        assert path is not None
        for lineno, line in read_lines(path):
            name = line.split()[0]
            require(name.lower().endswith((".jpg", ".jpeg")), path, f"line {lineno}",
                    f"expected an image file name like 1000268201_693b08cb0e.jpg, got {line!r}")
            split_of[Path(name).stem] = split
    return split_of


def _karpathy(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    data = load_json(path)
    require(isinstance(data, dict) and isinstance(data.get("images"), list), path, "top level",
            'expected {"images": [...]} (Karpathy\'s dataset_flickr8k.json)')
    require_entries(data["images"], path, "images")
    split_of: dict[str, str] = {}
    texts: dict[str, list[str]] = {}
    for i, img in enumerate(data["images"]):
        where = f"images[{i}]"
        name = get_str(img, "filename", path, where)
        split = get_str(img, "split", path, where)
        assert name is not None and split is not None
        if split not in KARPATHY_SPLIT:
            raise PrepareError(f"{path}: {where}: unknown split {split!r} (expected train, val or test)")
        split_of[Path(name).stem] = KARPATHY_SPLIT[split]
        sentences = img.get("sentences", [])
        require(isinstance(sentences, list), path, where,
                f"'sentences' must be a list of objects, got {type(sentences).__name__}")
        # A sentence without text keeps its place (captions are numbered by position) but gives no transcript.
        texts[Path(name).stem] = [get_str(sentence, "raw", path, f"{where}.sentences[{j}]", required=False) or ""
                                  for j, sentence in enumerate(sentences)]
    return split_of, texts


def prepare_flickr8k(
    root: str | Path,
    out: str | Path,
    *,
    images: str | Path | None = None,
    splits: str = "auto",
    on_missing: str = "drop",
    check_files: bool = True,
) -> Path:
    """Write ``out/manifest.jsonl`` for FACC.

    ``splits``: ``"official"`` (the ``Flickr_8k.*Images.txt`` files), ``"karpathy"`` (``dataset_flickr8k.json``)
    or ``"auto"`` (official if present). ``images`` overrides the image folder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise PrepareError(f"corpus root {root} is not a folder")
    wav2capt = find_file(root, ["wav2capt.txt"], subdirs=["flickr_audio"], what="FACC index wav2capt.txt")
    wav_dir = wav2capt.parent / "wavs"
    wav2spk = find_optional(root, ["wav2spk.txt"], subdirs=["flickr_audio"])

    if splits not in ("auto", "official", "karpathy"):
        raise PrepareError(f"splits must be auto, official or karpathy, got {splits!r}")
    split_of = _official_splits(root) if splits in ("auto", "official") else None
    karpathy_texts: dict[str, list[str]] = {}
    if split_of is None:
        if splits == "official":
            raise PrepareError(f"Flickr8k split files {', '.join(SPLIT_FILES.values())} not found under {root} "
                               f"(or its {', '.join(TEXT_DIRS)} folders)")
        kp = find_file(root, ["dataset_flickr8k.json"], what="Flickr8k split files "
                       f"({', '.join(SPLIT_FILES.values())}) or Karpathy's split file")
        split_of, karpathy_texts = _karpathy(kp)

    texts: dict[tuple[str, int], str] = {}
    token = find_optional(root, ["Flickr8k.token.txt"], subdirs=TEXT_DIRS)
    if token is not None:
        for lineno, line in read_lines(token):
            key, sep, text = line.partition("\t")
            name, hsep, n = key.partition("#")
            number = decimal(n)
            require(bool(sep and hsep) and number is not None, token, f"line {lineno}",
                    f"expected '<img>.jpg#<n><TAB><caption>', got {line[:80]!r}")
            assert number is not None
            texts[(Path(name).stem, number)] = text
    else:
        for stem, sentences in karpathy_texts.items():
            for n, text in enumerate(sentences):
                texts[(stem, n)] = text

    speakers: dict[str, str] = {}
    if wav2spk is not None:
        for lineno, line in read_lines(wav2spk):
            parts = line.split()
            require(len(parts) == 2, wav2spk, f"line {lineno}", f"expected '<wav> <speaker>', got {line!r}")
            speakers[parts[0]] = parts[1]

    image_dir = as_path(images) or find_dir(root, IMAGE_DIRS)
    if image_dir is None:
        raise PrepareError(f"Flickr8k image folder not found: expected one of {', '.join(IMAGE_DIRS)} under "
                           f"{root}; pass images=DIR (--images)")

    builder = ManifestBuilder("flickr8k", Path(out), on_missing=on_missing, check_files=check_files)
    not_in_split = 0
    with_audio: set[str] = set()
    for lineno, line in read_lines(wav2capt):
        parts = line.split()
        number = decimal(parts[2][1:]) if len(parts) == 3 and parts[2].startswith("#") else None
        require(number is not None, wav2capt, f"line {lineno}",
                f"expected '<img>_<n>.wav <img>.jpg #<n>', got {line[:120]!r}")
        assert number is not None
        wav, img, _num = parts
        stem = Path(img).stem
        split = split_of.get(stem)
        if split is None:
            not_in_split += 1
            continue
        with_audio.add(stem)
        builder.add(
            caption_id=Path(wav).stem,
            audio=wav_dir / wav,
            image=image_dir / img,
            image_id=stem,
            split=split,
            text=texts.get((stem, number)),
            speaker=speakers.get(wav),
        )
    builder.notes.update(
        captions_not_in_any_split=not_in_split,
        split_images_without_audio=sorted(set(split_of) - with_audio),
        speakers_file=str(wav2spk) if wav2spk else None,
        transcripts=bool(texts),
    )
    return builder.finish()
