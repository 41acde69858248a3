"""``evaluate_keyword_hit_rate`` (and ``vgskit eval --keyword-hit-rate``): a hand-checkable case with fixed keyword
outputs over a real CLIP tokenizer, the real tiny SpeechCLIP against a brute-force count, and the errors."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn
from transformers import CLIPTokenizer

import _toy_models  # noqa: F401  (registers the test models)
from _tiny_speechclip import CAPTIONS, WORDS, Towers, make_towers, perturb, tiny_config, write_clip_tokenizer
from vgskit.cli import main
from vgskit.contract import SpeechInputs
from vgskit.data.manifest import read_manifest
from vgskit.encoders.text import load_clip_tokenizer
from vgskit.errors import ConfigError, VGSKitError
from vgskit.experiment import make_dataset
from vgskit.extensions import get_evaluation
from vgskit.models.registry import create_model, save_pretrained
from vgskit.models.speechclip import (
    SpeechCLIP,
    build_keyword_vocabulary,
    evaluate_keyword_hit_rate,
    format_keyword_hit_rate,
    special_token_ids,
)
from vgskit.retrieval.evaluate import evaluate

# ---------------------------------------------------------------------------------------------------------
# A hand-checkable case: keywords on a circle
# ---------------------------------------------------------------------------------------------------------

# Vocabulary rows as 2-D directions (degrees); the norms differ, so only a cosine ranking gives these neighbours.
ANGLES = {"red</w>": 0, "blue</w>": 15, "white</w>": 35, "dog</w>": 60, "cat</w>": 90, "bag</w>": 125, ",</w>": 200}
# Special rows placed right next to real ones: counted as neighbours, they would change the results below.
SPECIAL_ANGLES = {"!": 300, "<|startoftext|>": 91, "<|endoftext|>": 14}
# The subword each of 3 slots selects, per caption (CAPTIONS[0]: "a small red bag left of a blue dog",
# CAPTIONS[1]: "the large green sneaker, on a white background").
PICKS = [["cat</w>", "white</w>", ",</w>"], ["cat</w>", "blue</w>", ",</w>"]]
# Slot vectors before quantisation ("slot" mode), in degrees.
SLOT_ANGLES = [[50, 92, 190], [50, 36, 190]]


def _direction(degrees: float, norm: float) -> list[float]:
    return [norm * math.cos(math.radians(degrees)), norm * math.sin(math.radians(degrees))]


class FixedKeywordModel(nn.Module):
    """The keyword interface of a cascaded model, with fixed outputs per caption (read from the waveform)."""

    def __init__(self, tokenizer, *, with_tokenizer: bool = True):
        super().__init__()
        self.tokenizer = tokenizer
        angles = {**ANGLES, **SPECIAL_ANGLES}
        self.ids = torch.tensor([tokenizer.convert_tokens_to_ids(t) for t in angles])
        self.table = torch.tensor([_direction(a, 0.5 + i) for i, a in enumerate(angles.values())])
        self.text_tower = SimpleNamespace(tokenizer=tokenizer if with_tokenizer else None)
        self.calls: list[list[int]] = []

    def keyword_table(self) -> Tensor:
        return self.table

    @property
    def keyword_token_ids(self) -> Tensor:
        return self.ids

    def _captions(self, wavs: Tensor) -> list[int]:
        assert not self.training  # evaluated in eval mode
        captions = [int(v) for v in wavs[:, 0]]
        self.calls.append(captions)
        return captions

    def keyword_ids(self, wavs: Tensor, lengths: Tensor, top_k: int = 5) -> tuple[Tensor, Tensor]:
        assert top_k == 1
        picks = [[self.tokenizer.convert_tokens_to_ids(t) for t in PICKS[c]] for c in self._captions(wavs)]
        ids = torch.tensor(picks)[..., None]  # [B, K, 1]
        return ids, torch.ones(ids.shape)

    def keyword_embeddings(self, wavs: Tensor, lengths: Tensor) -> Tensor:
        return torch.tensor([[_direction(a, 3.0) for a in SLOT_ANGLES[c]] for c in self._captions(wavs)])


@dataclass
class Caption:
    caption_id: str
    text: str | None


class FixedCaptions:
    """The dataset interface the evaluation reads: records with transcripts and waveforms (sample 0 = index)."""

    def __init__(self, texts: list[str | None]):
        self.records = [Caption(f"c{i}", t) for i, t in enumerate(texts)]

    def __len__(self) -> int:
        return len(self.records)

    def num_samples(self) -> list[int]:
        return [800 - 300 * i for i in range(len(self))]  # later captions are shorter: embedded first

    def waveform(self, index: int) -> Tensor:
        return torch.full((self.num_samples()[index],), float(index))

    def speech_inputs(self, indices: list[int]) -> SpeechInputs:
        wavs = [self.waveform(i) for i in indices]
        return SpeechInputs.waveform(torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True),
                                     torch.tensor([len(w) for w in wavs]))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_clip_tokenizer(folder, WORDS)
    return CLIPTokenizer.from_pretrained(str(folder))


def test_the_fixture_tokenizes_as_the_hand_count_assumes(tokenizer) -> None:
    subwords = [set(tokenizer.convert_ids_to_tokens(tokenizer(c, add_special_tokens=False)["input_ids"]))
                for c in CAPTIONS]
    assert subwords[0] == {"a</w>", "small</w>", "red</w>", "bag</w>", "left</w>", "of</w>", "blue</w>", "dog</w>"}
    assert {"white</w>", "sneaker</w>", ",</w>", "large</w>"} <= subwords[1]  # ("background" is spelled out)
    assert not {"red</w>", "blue</w>", "dog</w>", "cat</w>", "bag</w>"} & subwords[1]
    assert {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_ANGLES} == special_token_ids(tokenizer)


@pytest.mark.parametrize(
    ("top_k", "expected"),
    [
        # slot 1 picks "cat" twice: its neighbours are dog, then bag (not start-of-text, 1 degree away).
        # slot 2 picks "white" for caption 0 (neighbour blue: hit) and "blue" for caption 1 (neighbours red,
        # then white: a hit from top-3; not end-of-text, 1 degree away). slot 3 picks "," (in caption 1 only;
        # its nearest neighbour "bag" is in caption 0).
        (1, [0.0, 0.0, 50.0]),
        (2, [50.0, 50.0, 100.0]),
        (3, [50.0, 100.0, 100.0]),
    ],
)
@pytest.mark.parametrize("batch_size", [1, 64])
def test_hand_checked_hit_rates(tokenizer, top_k, expected, batch_size) -> None:
    model = FixedKeywordModel(tokenizer).train()
    result = evaluate_keyword_hit_rate(model, FixedCaptions(list(CAPTIONS)), top_k=top_k, batch_size=batch_size)
    assert result["per_slot"] == pytest.approx(expected)
    assert result["mean"] == pytest.approx(sum(expected) / 3)
    assert (result["top_k"], result["n_captions"], result["keywords"]) == (top_k, 2, "chosen")
    assert model.training  # the mode is restored
    assert model.calls[0][0] == 1  # captions are embedded shortest first


def test_hand_checked_slot_vectors(tokenizer) -> None:
    # Slot vectors at 50 degrees -> dog; 92 -> cat (start-of-text at 91 is no candidate); 36 -> white; 190 -> ",".
    model = FixedKeywordModel(tokenizer)
    result = evaluate_keyword_hit_rate(model, FixedCaptions(list(CAPTIONS)), top_k=1, keywords="slot")
    assert result["per_slot"] == pytest.approx([50.0, 50.0, 50.0]) and result["keywords"] == "slot"
    text = format_keyword_hit_rate(result)
    assert "top-1" in text and "slot vector" in text and "slot  3:  50.00 %" in text and "mean   :  50.00 %" in text


def test_errors_name_what_is_missing(tokenizer) -> None:
    model = FixedKeywordModel(tokenizer)
    with pytest.raises(VGSKitError, match=r"manifest\.jsonl \(split 'test'\): 1 of 2 captions have no transcript"):
        evaluate_keyword_hit_rate(model, FixedCaptions([CAPTIONS[0], None]), source="manifest.jsonl (split 'test')")
    with pytest.raises(ConfigError, match="keywords: must be one of"):
        evaluate_keyword_hit_rate(model, FixedCaptions(list(CAPTIONS)), keywords="quantized")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"top_k: must be in \[1, 7\]"):
        evaluate_keyword_hit_rate(model, FixedCaptions(list(CAPTIONS)), top_k=8)
    with pytest.raises(VGSKitError, match="no tokenizer files"):
        evaluate_keyword_hit_rate(FixedKeywordModel(tokenizer, with_tokenizer=False), FixedCaptions(list(CAPTIONS)))
    with pytest.raises(VGSKitError, match="'Linear' has no keyword slots"):
        evaluate_keyword_hit_rate(nn.Linear(2, 2), FixedCaptions(list(CAPTIONS)))


# ---------------------------------------------------------------------------------------------------------
# The real tiny SpeechCLIP
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> Towers:
    return make_towers(tmp_path_factory)


def _brute_force(model: SpeechCLIP, ds, top_k: int, keywords: str) -> list[float]:
    tok = model.text_tower.tokenizer
    table, ids = model.keyword_table(), model.keyword_token_ids
    keep = [i for i, t in enumerate(ids.tolist()) if t not in special_token_ids(tok)]
    hits = torch.zeros(model.config.cascaded.num_keywords)
    for i in range(len(ds)):
        wav = ds.waveform(i)
        with torch.no_grad():
            if keywords == "chosen":
                chosen = model.keyword_ids(wav[None], torch.tensor([len(wav)]), top_k=1)[0][0, :, 0]
                vectors = table[[ids.tolist().index(int(t)) for t in chosen]]
            else:
                vectors = model.keyword_embeddings(wav[None], torch.tensor([len(wav)]))[0]
        own = set(tok(ds.records[i].text, add_special_tokens=False)["input_ids"])
        for slot, vector in enumerate(vectors):
            cos = torch.nn.functional.cosine_similarity(vector[None], table[keep], dim=-1)
            nearest = {int(ids[keep[j]]) for j in cos.topk(top_k).indices}
            hits[slot] += bool(nearest & own)
    return (100 * hits / len(ds)).tolist()


def test_real_model_matches_a_brute_force_count(towers, tiny_manifest) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        texts = [str(r.text) for r in read_manifest(tiny_manifest, split="train")]
        vocab = build_keyword_vocabulary(load_clip_tokenizer(str(towers.clip)), texts)
        torch.manual_seed(0)
        model = SpeechCLIP(tiny_config(towers, "both", keyword_vocab=vocab))
        perturb(model)
        model.eval()
        ds = make_dataset(tiny_manifest, "test", model.image_transform, max_seconds=None, preload=True,
                          progress=False)
        for keywords in ("chosen", "slot"):
            got = evaluate_keyword_hit_rate(model, ds, top_k=2, keywords=keywords, batch_size=16)
            assert got["per_slot"] == pytest.approx(_brute_force(model, ds, 2, keywords)), keywords
            assert got["n_captions"] == len(ds) == 40
        with pytest.raises(VGSKitError, match="needs the cascaded branch"):
            evaluate_keyword_hit_rate(SpeechCLIP(tiny_config(towers, "parallel")), ds)

        # The registered evaluation: the same numbers beside the recall, from one evaluate() call.
        results = evaluate(model, ds, extras={"keyword_hit_rate": {"top_k": 2}}, batch_size=16)
        direct = evaluate_keyword_hit_rate(model, ds, top_k=2, batch_size=16)
        assert results["keyword_hit_rate"] == direct and "speech_to_image" in results
        with pytest.raises(ConfigError, match=r"unknown option\(s\) \['top'\]"):
            evaluate(model, ds, extras={"keyword_hit_rate": {"top": 2}}, batch_size=16)
        # A model without the branch is refused before any embedding pass.
        parallel = SpeechCLIP(tiny_config(towers, "parallel"))
        parallel.embed_speech = None  # would fail if it were reached
        with pytest.raises(VGSKitError, match="needs the cascaded branch"):
            evaluate(parallel, ds, extras=["keyword_hit_rate"])
    finally:
        torch.set_num_threads(threads)


def test_registered_evaluation_flags_and_table() -> None:
    ev = get_evaluation("keyword_hit_rate")
    parser = argparse.ArgumentParser()
    ev.add_cli_arguments(parser)
    assert ev.options_from_args(parser.parse_args([])) is None
    assert ev.options_from_args(parser.parse_args(["--keyword-hit-rate"])) == {"top_k": 5}
    assert ev.options_from_args(parser.parse_args(["--keyword-hit-rate", "--keyword-top-k", "3"])) == {"top_k": 3}
    with pytest.raises(VGSKitError, match="--keyword-top-k must be >= 1, got 0"):
        ev.options_from_args(parser.parse_args(["--keyword-hit-rate", "--keyword-top-k", "0"]))
    assert dict(ev.options) == {"top_k": 5, "keywords": "chosen"}
    result = {"per_slot": [50.0, 25.0], "mean": 37.5, "top_k": 3, "keywords": "chosen", "n_captions": 4}
    assert ev.format is not None and ev.format(result) == format_keyword_hit_rate(result)


def test_eval_cli_refuses_models_without_keywords(tiny_manifest: Path, tmp_path: Path, capsys) -> None:
    plain = save_pretrained(create_model("test_no_extras"), tmp_path / "plain")
    code = main(["eval", "--checkpoint", str(plain), "--manifest", str(tiny_manifest), "--keyword-hit-rate"])
    assert code == 2
    assert "has no keyword slots" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(plain), "--manifest", str(tiny_manifest), "--keyword-hit-rate",
                 "--keyword-top-k", "0"]) == 2
    assert "--keyword-top-k must be >= 1" in capsys.readouterr().err
