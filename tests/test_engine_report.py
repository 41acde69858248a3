"""SearchEngine persistence/errors and the HTML/JSON report, on small hand-made inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vgskit.errors import VGSKitError
from vgskit.models.registry import create_model
from vgskit.report import write_report
from vgskit.retrieval.engine import SearchEngine

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, colour in enumerate(COLOURS):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (40, 30), colour).save(p)
        paths.append(str(p))
    return paths


def _solid_pixels(model, colours) -> torch.Tensor:
    """Normalised pixels ``[N, 3, S, S]`` of solid-colour images, built by hand: resizing a solid image (any
    mode, any filter) leaves every pixel at its colour, so only the model's size, mean and std matter."""
    t = model.image_transform
    rgb = torch.tensor(colours, dtype=torch.float32) / 255.0  # [N, 3]
    x = (rgb - torch.tensor(t["mean"])) / torch.tensor(t["std"])
    return x[:, :, None, None].expand(-1, -1, t["size"], t["size"]).contiguous()


def _gallery_around(query: torch.Tensor, cosines: list[float], seed: int = 1) -> torch.Tensor:
    """Unit vectors whose dot products with the unit vector ``query`` are exactly ``cosines`` (up to rounding)."""
    other = torch.randn(query.shape[0], generator=torch.Generator().manual_seed(seed))
    other = F.normalize(other - (other @ query) * query, dim=0)  # orthogonal to the query
    return torch.stack([c * query + math.sqrt(1.0 - c * c) * other for c in cosines])


def test_engine_build_save_load_and_search(images, tmp_path):
    torch.manual_seed(0)
    model = create_model("dual_encoder_tiny").eval()
    engine = SearchEngine.build(model, images, ["r", "g", "b"])
    # Each id holds its own image's embedding, computed here from hand-made pixels (same batch of three:
    # same kernels; the inputs differ at most by the rounding of the normalisation).
    with torch.no_grad():
        expected = model.encode_image(_solid_pixels(model, COLOURS))
    torch.testing.assert_close(engine.image_emb, expected, atol=1e-5, rtol=0)
    assert min(float((expected[i] - expected[j]).abs().max()) for i in range(3) for j in range(i)) > 1e-3
    assert engine.image_ids == ["r", "g", "b"] and engine.image_paths == images
    engine.save(tmp_path / "index")
    again = SearchEngine.load(tmp_path / "index", model)
    assert torch.equal(again.image_emb, engine.image_emb) and again.image_ids == ["r", "g", "b"]
    assert again.image_paths == images

    wav = np.sin(np.linspace(0, 2000, 16000)).astype(np.float32) * 0.3
    with torch.no_grad():  # the query embedding, straight from the model
        query = model.encode_speech(torch.from_numpy(wav)[None], torch.tensor([len(wav)]))[0]
    scores = expected @ query  # brute force
    order = sorted(range(3), key=lambda i: -float(scores[i]))
    assert min(abs(float(scores[i] - scores[j])) for i in range(3) for j in range(i)) > 1e-4  # no near-ties
    hits = again.search_by_waveform(wav, k=5)  # more than the gallery holds: all 3, best first
    assert [h.rank for h in hits] == [1, 2, 3]
    assert [h.item_id for h in hits] == [["r", "g", "b"][i] for i in order]
    assert [h.path for h in hits] == [images[i] for i in order]
    assert [h.score for h in hits] == pytest.approx([float(scores[i]) for i in order], abs=1e-5)

    # A gallery whose answer is known by construction: item i scores cosines[i] against the query.
    cosines = [0.2, -0.6, 0.9, 0.5, -0.1, 0.75]
    ids = [f"item{i}" for i in range(len(cosines))]
    paths = [f"/gallery/{i}.png" for i in ids]
    gallery = _gallery_around(query, cosines)
    SearchEngine(model, gallery, ids, paths).save(tmp_path / "built")
    loaded = SearchEngine.load(tmp_path / "built", model)
    for i, item in enumerate(ids):  # ids, paths and embedding rows still belong together
        row = loaded.image_ids.index(item)
        assert loaded.image_paths[row] == paths[i] and torch.equal(loaded.image_emb[row], gallery[i])
    hits = loaded.search_by_waveform(wav, k=4)
    assert [h.item_id for h in hits] == ["item2", "item5", "item3", "item0"]
    assert [h.path for h in hits] == ["/gallery/item2.png", "/gallery/item5.png", "/gallery/item3.png",
                                      "/gallery/item0.png"]
    assert [h.score for h in hits] == pytest.approx([0.9, 0.75, 0.5, 0.2], abs=1e-5)
    assert [h.item_id for h in loaded.search_by_waveform(wav, k=1)] == ["item2"]

    with pytest.raises(VGSKitError, match="k must be >= 1"):
        again.search_by_waveform(wav, k=0)
    with pytest.raises(VGSKitError, match="too short"):
        again.search_by_waveform(wav[:100])
    with pytest.raises(VGSKitError, match="1-D mono"):
        again.search_by_waveform(np.stack([wav, wav], axis=1))
    with pytest.raises(VGSKitError, match="NaN"):
        again.search_by_waveform(np.full(16000, np.nan, dtype=np.float32))
    other = create_model("dual_encoder_tiny", embed_dim=16)
    with pytest.raises(VGSKitError, match="another checkpoint"):
        SearchEngine.load(tmp_path / "index", other)
    (tmp_path / "index" / "index.json").write_text("{broken")
    with pytest.raises(VGSKitError, match="unreadable index files"):
        SearchEngine.load(tmp_path / "index", model)


def test_engine_errors_name_the_problem(images, tmp_path):
    model = create_model("dual_encoder_tiny")
    with pytest.raises(VGSKitError, match="missing index.json"):
        SearchEngine.load(tmp_path, model)
    with pytest.raises(VGSKitError, match="inconsistent"):
        SearchEngine(model, torch.zeros(2, 4), ["a"], ["a.png"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(Image.open(images[0]).tobytes()[:10])
    with pytest.raises(VGSKitError, match="broken.png"):
        SearchEngine.build(model, [images[0], str(broken)])


def test_report_html_and_json(images, tmp_path):
    results = {"speech_to_image": {"R@1": 12.34, "R@5": 45.6, "R@10": 78.9, "median_rank": 3},
               "image_to_speech": {"R@1": 23.4, "R@5": 56.7, "R@10": 89.01, "median_rank": 2}}
    ceiling = {"speech_to_image": {"R@1": 97.6, "R@5": 99.9, "R@10": 100.0},
               "image_to_speech": {"R@1": 95.2, "R@5": 100.0, "R@10": 100.0}}
    rows = [{"kind": "train", "step": s, "loss": 5.0 / s} for s in range(1, 20)]
    rows += [{"kind": "eval", "step": 10, "val/mean_R@10": 40.0}, {"kind": "eval", "step": 19, "val/mean_R@10": 60.0}]
    queries = [{"audio": None, "transcript": "a red <b>shirt</b>", "gold_image_id": "g",
                "hits": [{"rank": i + 1, "item_id": x, "path": p, "score": 1.0 - i / 10}
                         for i, (x, p) in enumerate(zip("rgb", images, strict=True))]}]
    html_path, json_path = write_report(tmp_path / "rep", title="t", results=results, ceiling=ceiling,
                                        metrics_rows=rows, queries=queries, info={"steps": 19})
    html = html_path.read_text()
    for value in ("12.3", "78.9", "89.0", "97.6", "95.2"):
        assert value in html
    assert "a red &lt;b&gt;shirt&lt;/b&gt;" in html  # transcripts are escaped
    assert html.count("class='hit gold'") == 1
    assert (tmp_path / "rep" / "training_curve.png").is_file()
    data = json.loads(json_path.read_text())
    assert data["results"] == results and data["ceiling"] == ceiling and data["info"] == {"steps": 19}


def test_report_without_training_rows_has_no_curve(tmp_path):
    results = {"speech_to_image": {"R@1": 1.0, "R@5": 2.0, "R@10": 3.0},
               "image_to_speech": {"R@1": 1.0, "R@5": 2.0, "R@10": 3.0}}
    html_path, _ = write_report(tmp_path, title="t", results=results)
    assert "training curve" not in html_path.read_text()
    assert not (tmp_path / "training_curve.png").exists()
