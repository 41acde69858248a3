"""vgskit models inside mteb (``vgskit.integrations.mteb``), checked against vgskit's own evaluation.

A local mteb retrieval task is built from the generated spoken-scenes tiny corpus (all 40 images and their 200
spoken captions, data in memory: nothing is downloaded) in both directions, a random-weight ``dual_encoder_tiny``
is wrapped and run through ``mteb.evaluate``, and mteb's numbers are compared with recall computed by
:mod:`vgskit.metrics` on embeddings from vgskit's own data pipeline.

The mapping asserted here: the papers' R@K (vgskit's ``R@K``, percent) is mteb's ``hit_rate_at_k`` x 100 in both
directions. mteb's ``recall_at_k`` is IR recall (share of the relevant items found in the top K): equal to
``hit_rate_at_k`` for speech -> image (one relevant image per caption), smaller for image -> speech (five
relevant captions per image).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from vgskit.audio import load_audio, resample
from vgskit.contract import Embeddings, ImageInputs, SpeechInputs
from vgskit.data.manifest import read_manifest
from vgskit.experiment import make_dataset
from vgskit.images import load_image
from vgskit.metrics import recall_at_k
from vgskit.models import create_model
from vgskit.models.dual_encoder import DualEncoder
from vgskit.retrieval.evaluate import embed_images, embed_speech, evaluate_retrieval, pair_scorer

KS = (1, 5, 10)
RERANK_KS = (1, 3, 5)  # K <= the re-ranking cut-off (top_k = 5)
CAPTIONS_PER_IMAGE = 5


@pytest.fixture(scope="module")
def mteb() -> Any:
    return pytest.importorskip("mteb", reason="mteb is not installed (pip install 'vgskit[mteb]')")


def _tiny_model(cls: type = DualEncoder) -> Any:
    torch.manual_seed(0)
    model = create_model("dual_encoder_tiny")
    if cls is not DualEncoder:
        fine = cls(model.config)
        fine.load_state_dict(model.state_dict())
        fine.model_name = "dual_encoder_tiny_fine"
        model = fine
    return model.eval()


@pytest.fixture(scope="module")
def model() -> Any:
    return _tiny_model()


@pytest.fixture(scope="module")
def corpus(tiny_manifest: Path, model: Any) -> dict[str, Any]:
    """The whole tiny corpus (every split): vgskit's dataset and reference embeddings, and the raw items."""
    records = read_manifest(tiny_manifest)
    ds = make_dataset(tiny_manifest, "all", model.image_transform, max_seconds=None, preload=False,
                      progress=False, records=records)
    image_path = {r.image_id: r.image for r in records}
    return {
        "records": records,
        "dataset": ds,
        "speech": embed_speech(model, ds, batch_size=16).pooled,
        "image": embed_images(model, ds, batch_size=16).pooled,
        "caption_image": torch.tensor(ds.caption_image_index, dtype=torch.long),
        "image_ids": list(ds.image_keys),
        "image_paths": [image_path[k] for k in ds.image_keys],
    }


@pytest.fixture(scope="module")
def mteb_data(mteb: Any, corpus: dict[str, Any]) -> dict[str, Any]:
    """The captions and the images as mteb datasets: ``{"id", "audio": {"array", "sampling_rate"}}`` (mteb's
    ``AudioInputItem``) and ``{"id", "image"}`` (a ``datasets.Image`` column, decoded to PIL images)."""
    from datasets import Dataset, Features, Image, Value
    from datasets import List as ListFeature

    records = corpus["records"]
    audio_features = Features({"id": Value("string"), "audio": {"array": ListFeature(Value("float32")),
                                                                "sampling_rate": Value("int32")}})
    captions = Dataset.from_dict(
        {"id": [r.caption_id for r in records],
         "audio": [{"array": load_audio(r.audio, max_seconds=None), "sampling_rate": 16000} for r in records]},
        features=audio_features).with_format("numpy")  # rows as numpy arrays: much faster than lists
    images = Dataset.from_dict({"id": corpus["image_ids"], "image": [load_image(p) for p in corpus["image_paths"]]},
                               features=Features({"id": Value("string"), "image": Image()}))
    return {"records": records, "captions": captions, "images": images}


def _local_task(direction: str, data: dict[str, Any]) -> Any:
    """An mteb retrieval task over the corpus, in mteb's format (queries, corpus, qrels), data in memory."""
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    records, captions, images = data["records"], data["captions"], data["images"]
    if direction == "a2i":
        queries, documents = captions, images
        qrels = {r.caption_id: {r.image_id: 1} for r in records}
    else:
        queries, documents = images, captions
        qrels: dict[str, dict[str, int]] = {}
        for r in records:
            qrels.setdefault(r.image_id, {})[r.caption_id] = 1
    split = {"queries": queries, "corpus": documents, "relevant_docs": qrels, "top_ranked": None}

    class SpokenScenesRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=f"SpokenScenes{direction.upper()}Retrieval",
            description="Spoken-scenes tiny corpus (generated locally): "
                        + ("spoken captions retrieve their image." if direction == "a2i"
                           else "images retrieve their spoken captions."),
            dataset={"path": "local/spoken-scenes-tiny", "revision": "local"},
            type="Any2AnyRetrieval",
            category=direction,
            modalities=["audio", "image"],
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            main_score="ndcg_at_10",
        )

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            self.dataset = {"default": {"test": dict(split)}}
            self.data_loaded = True

    return SpokenScenesRetrieval()


@pytest.fixture(scope="module")
def tasks(mteb_data: dict[str, Any]) -> dict[str, Any]:
    return {d: _local_task(d, mteb_data) for d in ("a2i", "i2a")}


def _scores(result: Any) -> dict[str, dict[str, float]]:
    out = {}
    for task_result in result.task_results:
        direction = "a2i" if "A2I" in task_result.task_name else "i2a"
        out[direction] = task_result.scores["test"][0]
    return out


def _ir_recall(scores: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
    """Mean over queries of (relevant items in the top k) / (relevant items): IR recall, from scratch."""
    top = scores.topk(k, dim=1).indices
    found = relevant.gather(1, top).sum(dim=1).double()
    return float((found / relevant.sum(dim=1).double()).mean())


# ---------------------------------------------------------------------------------------------------- tests


def test_missing_mteb_names_the_extra(monkeypatch: pytest.MonkeyPatch, model: Any) -> None:
    from vgskit.integrations import mteb as integration

    monkeypatch.setitem(sys.modules, "mteb", None)  # `import mteb` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'vgskit\[mteb\]'"):
        integration.as_mteb(model)
    with pytest.raises(ImportError, match=r"pip install 'vgskit\[mteb\]'"):
        integration.MtebModel(model)


def test_protocol_and_model_meta(mteb: Any, model: Any) -> None:
    from mteb.models import CrossEncoderProtocol, EncoderProtocol, ModelMeta

    from vgskit.integrations.mteb import MtebCrossEncoder, as_mteb

    wrapped = as_mteb(model, revision="r1", license="apache-2.0")
    assert isinstance(wrapped, EncoderProtocol)
    meta = wrapped.mteb_model_meta
    assert isinstance(meta, ModelMeta)
    assert meta.name == "vgskit/dual_encoder_tiny" and meta.revision == "r1" and meta.license == "apache-2.0"
    assert meta.modalities == ["audio", "image"]
    assert meta.embed_dim == model.embed_dim
    assert meta.n_parameters == sum(p.numel() for p in model.parameters())
    assert meta.similarity_fn_name == "dot" and meta.model_type == ["dense"]
    assert "PyTorch" in meta.framework
    with pytest.raises(Exception, match="no fine scorer"):
        MtebCrossEncoder(model)
    fine = as_mteb(_tiny_model(_PooledL1Model), cross_encoder=True)
    assert isinstance(fine, CrossEncoderProtocol) and fine.mteb_model_meta.model_type == ["cross-encoder"]

    # similarity is the plain dot product (no normalisation added by the wrapper)
    a, b = np.random.default_rng(0).normal(size=(3, 4)), np.random.default_rng(1).normal(size=(5, 4)) * 3
    sim = wrapped.similarity(a.astype(np.float32), b.astype(np.float32))
    assert np.allclose(sim.numpy(), a @ b.T, atol=1e-5)


def test_encode_equals_vgskit_embeddings(mteb: Any, model: Any, corpus: dict[str, Any], tasks: dict[str, Any]) -> None:
    """encode() through mteb's own dataloaders returns model.embed_speech / embed_image pooled vectors."""
    from mteb._create_dataloaders import create_dataloader
    from mteb.types import PromptType

    from vgskit.integrations.mteb import as_mteb

    wrapped = as_mteb(model)
    task = tasks["a2i"]
    task.load_data()
    split = task.dataset["default"]["test"]
    speech = wrapped.encode(create_dataloader(split["queries"], task_metadata=task.metadata,
                                              prompt_type=PromptType.query, batch_size=7),
                            task_metadata=task.metadata, hf_split="test", hf_subset="default",
                            prompt_type=PromptType.query)
    image = wrapped.encode(create_dataloader(split["corpus"], task_metadata=task.metadata,
                                             prompt_type=PromptType.document, batch_size=7),
                           task_metadata=task.metadata, hf_split="test", hf_subset="default",
                           prompt_type=PromptType.document)
    assert isinstance(speech, np.ndarray) and speech.dtype == np.float32
    assert speech.shape == tuple(corpus["speech"].shape) and image.shape == tuple(corpus["image"].shape)
    assert np.allclose(speech, corpus["speech"].numpy(), atol=1e-5)
    assert np.allclose(image, corpus["image"].numpy(), atol=1e-5)


def test_audio_and_image_items_of_any_kind(mteb: Any, model: Any, corpus: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image

    from vgskit.integrations.mteb import as_mteb

    wrapped = as_mteb(model)
    record = corpus["records"][3]
    wav = load_audio(record.audio, max_seconds=None)  # 16 kHz float32

    def speech_ref(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
        with torch.no_grad():
            return model.embed_speech(SpeechInputs.waveform(t, torch.tensor([t.shape[1]]))).pooled[0].numpy()

    row = corpus["speech"][3].numpy()
    at_22k = resample(wav, 16000, 22050)
    pcm = np.round(np.clip(wav, -1, 32767 / 32768) * 32768).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, 16000, format="WAV", subtype="PCM_16")
    cases = {
        "path": (str(record.audio), row),
        "bytes": ({"bytes": buf.getvalue(), "path": None}, row),
        "tensor at the model's rate": (torch.from_numpy(wav), row),
        # another rate: the wrapper resamples to 16 kHz with vgskit.audio.resample
        "22.05 kHz": ({"array": at_22k, "sampling_rate": 22050}, speech_ref(resample(at_22k, 22050, 16000))),
        # int16 PCM, two identical channels first: scaled by 1/32768 and averaged
        "int16 stereo": ({"array": np.stack([pcm, pcm]), "sampling_rate": 16000}, speech_ref(pcm / 32768.0)),
    }
    for label, (item, expected) in cases.items():
        got = wrapped.encode([{"audio": [item]}])
        assert np.allclose(got[0], expected, atol=1e-5), label
    # the 22.05 kHz case must differ from reading the samples as 16 kHz (the rate is honoured, not ignored)
    as_if_16k = wrapped.encode([{"audio": [{"array": at_22k, "sampling_rate": 16000}]}])[0]
    assert not np.allclose(as_if_16k, cases["22.05 kHz"][1], atol=1e-3)

    path = corpus["image_paths"][2]
    img = load_image(path)
    arr = np.asarray(img)
    rgba = img.convert("RGBA")
    image_row = corpus["image"][2].numpy()
    for label, item in {"PIL": img, "path": str(path), "HxWx3 uint8": arr,
                        "3xHxW uint8 tensor": torch.from_numpy(arr.copy()).permute(2, 0, 1),
                        "HxWx3 float": arr / 255.0, "opaque RGBA": rgba}.items():
        got = wrapped.encode([{"image": [item]}])
        assert np.allclose(got[0], image_row, atol=1e-5), label
    with pytest.raises(Exception, match="both audio and images"):
        wrapped.encode([{"audio": [wav], "image": [img]}])
    assert isinstance(rgba, Image.Image)


def test_mteb_evaluate_matches_vgskit_recall(mteb: Any, model: Any, corpus: dict[str, Any],
                                             tasks: dict[str, Any]) -> None:
    """mteb.evaluate on the local tasks: hit_rate_at_k x 100 == the papers' R@K from vgskit.metrics."""
    from vgskit.integrations.mteb import as_mteb

    result = mteb.evaluate(as_mteb(model), tasks=[tasks["a2i"], tasks["i2a"]], cache=None,
                           show_progress_bar=False, encode_kwargs={"batch_size": 16})
    scores = _scores(result)
    speech, image, caption_image = corpus["speech"], corpus["image"], corpus["caption_image"]
    ours = recall_at_k(speech, image, caption_image, ks=KS, ir_metrics=True)
    s2i, i2s = ours["speech_to_image"], ours["image_to_speech"]
    assert s2i["n_queries"] == 200 and i2s["n_queries"] == 40
    # image -> speech IR recall, computed from scratch on the same embeddings
    relevant = (caption_image[None, :] == torch.arange(len(image))[:, None]).long()  # [images, captions]
    i2s_scores = image @ speech.T

    rows = []
    for k in KS:
        a2i_hit, a2i_rec = scores["a2i"][f"hit_rate_at_{k}"], scores["a2i"][f"recall_at_{k}"]
        i2a_hit, i2a_rec = scores["i2a"][f"hit_rate_at_{k}"], scores["i2a"][f"recall_at_{k}"]
        # speech -> image: the papers' R@K is hit_rate_at_k, and recall_at_k equals it (one relevant image)
        assert 100 * a2i_hit == pytest.approx(s2i[f"R@{k}"], abs=1e-9)
        assert a2i_rec == pytest.approx(a2i_hit, abs=1e-9)
        # image -> speech: the papers' R@K is hit_rate_at_k; recall_at_k is IR recall over the 5 captions
        assert 100 * i2a_hit == pytest.approx(i2s[f"R@{k}"], abs=1e-9)
        assert i2a_rec == pytest.approx(_ir_recall(i2s_scores, relevant, k), abs=1e-5)
        rows.append((k, s2i[f"R@{k}"], 100 * a2i_hit, 100 * a2i_rec, i2s[f"R@{k}"], 100 * i2a_hit, 100 * i2a_rec))
    # at K = 1 at most one of an image's five captions is found: IR recall is exactly the hit rate / 5
    assert scores["i2a"]["recall_at_1"] == pytest.approx(scores["i2a"]["hit_rate_at_1"] / CAPTIONS_PER_IMAGE,
                                                         abs=1e-5)
    assert scores["i2a"]["recall_at_10"] < scores["i2a"]["hit_rate_at_10"]  # the names really differ
    # ranking metrics agree too (fractions; mteb rounds to 5 decimals)
    for direction, ours_dir in (("a2i", s2i), ("i2a", i2s)):
        assert scores[direction]["ndcg_at_10"] == pytest.approx(ours_dir["nDCG@10"], abs=1e-5)
        assert scores[direction]["mrr_at_1000"] == pytest.approx(ours_dir["MRR"], abs=1e-5)

    print("\nrandom-weight dual_encoder_tiny, spoken-scenes tiny corpus (40 images, 200 captions), percent")
    print(f"{'K':>3} | {'S->I vgskit R@K':>15} {'mteb hit_rate':>13} {'mteb recall':>11} | "
          f"{'I->S vgskit R@K':>15} {'mteb hit_rate':>13} {'mteb recall':>11}")
    for k, *values in rows:
        print(f"{k:>3} | {values[0]:>15.1f} {values[1]:>13.1f} {values[2]:>11.1f} | "
              f"{values[3]:>15.1f} {values[4]:>13.1f} {values[5]:>11.1f}")


class _PooledL1Model(DualEncoder):
    """The tiny dual encoder with a fine scorer that orders pairs differently from the dot product."""

    has_fine_scores = True

    def score_pairs(self, speech: Embeddings, image: Embeddings) -> torch.Tensor:
        return -(speech.pooled - image.pooled).abs().sum(dim=-1)  # [P]


def test_cross_encoder_reranking_matches_vgskit_coarse_to_fine(
    mteb: Any, corpus: dict[str, Any], mteb_data: dict[str, Any], tmp_path: Path
) -> None:
    """Encoder run -> convert_to_reranking(top_k) -> cross-encoder run == vgskit's coarse-to-fine R@K (K <= top_k)."""
    from vgskit.integrations.mteb import as_mteb

    model = _tiny_model(_PooledL1Model)
    top = 5
    encoder, fine = as_mteb(model), as_mteb(model, cross_encoder=True)
    a2i, i2a = _local_task("a2i", mteb_data), _local_task("i2a", mteb_data)
    mteb.evaluate(encoder, tasks=[a2i, i2a], cache=None, show_progress_bar=False,
                  prediction_folder=tmp_path, encode_kwargs={"batch_size": 32})
    reranking = [t.convert_to_reranking(tmp_path, top_k=top) for t in
                 (_local_task("a2i", mteb_data), _local_task("i2a", mteb_data))]
    scores = _scores(mteb.evaluate(fine, tasks=reranking, cache=None, show_progress_bar=False,
                                   encode_kwargs={"batch_size": 32}))

    ds = corpus["dataset"]
    speech_emb, image_emb = embed_speech(model, ds, batch_size=16), embed_images(model, ds, batch_size=16)
    ours = evaluate_retrieval(speech_emb.pooled, image_emb.pooled, corpus["caption_image"], ks=RERANK_KS,
                              reranker=pair_scorer(model, speech_emb, image_emb), rerank_top=top)
    coarse = recall_at_k(speech_emb.pooled, image_emb.pooled, corpus["caption_image"], ks=RERANK_KS)
    # mteb keeps only the top_k re-ranked candidates of each query: beyond K = top_k nothing more is found
    assert scores["a2i"]["hit_rate_at_10"] == scores["a2i"][f"hit_rate_at_{top}"]
    differs = False
    for k in RERANK_KS:
        assert 100 * scores["a2i"][f"hit_rate_at_{k}"] == pytest.approx(ours["speech_to_image"][f"R@{k}"], abs=1e-9)
        assert 100 * scores["i2a"][f"hit_rate_at_{k}"] == pytest.approx(ours["image_to_speech"][f"R@{k}"], abs=1e-9)
        differs |= ours["speech_to_image"][f"R@{k}"] != coarse["speech_to_image"][f"R@{k}"]
    assert differs, "the fine scorer should change the ranking, or this test checks nothing"
    # the pooled vectors the cross-encoder scores are the model's own
    with torch.no_grad():
        direct = model.embed_image(ImageInputs.from_pixels(ds.image_inputs([0]).pixels)).pooled
    assert torch.allclose(direct, image_emb.pooled[:1], atol=1e-6)
