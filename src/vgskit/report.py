"""Self-contained HTML report (plus the same results as JSON) for an evaluation run.

The page embeds every picture and audio clip as a data URI so that it can be mailed or archived as a
single file next to ``results.json``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vgskit.fileio import write_text_atomic

DIRECTIONS = (("speech_to_image", "speech → image"), ("image_to_speech", "image → speech"))


def plot_training_curve(rows: Sequence[dict], out_png: str | Path, *, metric: str = "mean_R@10") -> Path | None:
    """Training loss (left axis) and validation recall (right axis) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train" and "loss" in r]
    evals = [(r["step"], r[f"val/{metric}"]) for r in rows if r.get("kind") == "eval" and f"val/{metric}" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), color="tab:blue", lw=1, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals, strict=True), "o-", color="tab:orange", label=f"val {metric}")
        ax2.set_ylabel(f"validation {metric} (%)", color="tab:orange")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def plot_layer_weights(weights: Mapping[str, Sequence[float]], path: str | Path, *,
                       title: str = "Hidden-state weights of the speech tower") -> Path:
    """Bar chart of the softmax layer weights of each branch (a softmax-weighted sum of a speech tower's hidden states).

    One group of bars per hidden state, one bar per branch; x is the hidden-state index ``0 .. L-1``, where
    0 is the CNN output (the transformer's input) and ``i`` the output of transformer layer ``i``. A dashed
    line marks the uniform weight ``1/L`` the sum starts from, so layers the training favoured stand out.
    Written with matplotlib's Agg backend (no display needed); returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not weights:
        raise ValueError("plot_layer_weights: no branches to plot")
    rows = {str(name): [float(v) for v in values] for name, values in weights.items()}
    for name, values in rows.items():
        if not values or not all(math.isfinite(v) for v in values):
            raise ValueError(f"plot_layer_weights: branch {name!r} has no weights or non-finite ones: {values}")
    n_states = max(len(v) for v in rows.values())
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * n_states * max(1, len(rows)) + 2), 3.5), dpi=110)
    for b, (name, values) in enumerate(rows.items()):
        offsets = [i - 0.4 + width * (b + 0.5) for i in range(len(values))]
        ax.bar(offsets, values, width=width, label=name)
    lengths = {len(v) for v in rows.values()}
    if len(lengths) == 1:
        ax.axhline(1.0 / n_states, color="gray", lw=0.8, ls="--", label="uniform")
    ax.set_xticks(range(n_states))
    ax.set_xlabel("hidden state (0 = CNN output / transformer input)")
    ax.set_ylabel("softmax weight")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _data_uri(path: str | Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _thumbnail_uri(path: str | Path, size: int = 128) -> str:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _recall_table(results: dict[str, Any], ceiling: dict[str, Any] | None, ks: Sequence[int]) -> str:
    """The recall table; with gallery sizes in the results, also queries, gallery, chance rows and warnings.

    The same facts as :func:`vgskit.metrics.format_recall_table` prints, so that the page never shows a recall
    without the gallery it was measured on (R@10 = 100 over 8 images is what any ranking scores).
    """
    from vgskit.metrics import GALLERY_UNITS

    gallery = any("n_gallery" in results.get(key, {}) for key, _ in DIRECTIONS)
    head = "".join(f"<th>R@{k}</th>" for k in ks)
    head += "<th>median rank</th>" + ("<th>queries</th><th>gallery</th>" if gallery else "")
    rows = []
    warnings = []
    for key, label in DIRECTIONS:
        vals = results.get(key, {})
        cells = "".join(f"<td>{vals.get(f'R@{k}', float('nan')):.1f}</td>" for k in ks)
        extra = f"<td>{vals.get('median_rank', float('nan')):.0f}</td>"
        if gallery:
            extra += f"<td>{vals.get('n_queries', '')}</td><td>{vals.get('n_gallery', '')}</td>"
        rows.append(f"<tr><th>{label}</th>{cells}{extra}</tr>")
        blank = "<td></td>" * (3 if gallery else 1)
        if all(f"chance_R@{k}" in vals for k in ks):
            ccells = "".join(f"<td class=c>{vals[f'chance_R@{k}']:.1f}</td>" for k in ks)
            rows.append(f"<tr class=c><td>&nbsp;&nbsp;chance</td>{ccells}{blank}</tr>")
        if ceiling and key in ceiling:
            cvals = ceiling[key]
            ccells = "".join(f"<td class=c>{cvals.get(f'R@{k}', float('nan')):.1f}</td>" for k in ks)
            rows.append(f"<tr class=c><td>&nbsp;&nbsp;ceiling</td>{ccells}{blank}</tr>")
        if "n_gallery" in vals:
            n_gallery = int(vals["n_gallery"])
            big = [f"R@{k}" for k in ks if k >= n_gallery]
            if big:
                unit = GALLERY_UNITS.get(key, "items")
                unit = unit[:-1] if n_gallery == 1 else unit
                warnings.append(f"<p class=w>Warning: {html.escape(label)}: the gallery holds only {n_gallery} "
                                f"{unit}, so {', '.join(big)} (K &ge; gallery size) read 100 for any ranking.</p>")
    return f"<table><tr><th>direction</th>{head}</tr>" + "".join(rows) + "</table>" + "".join(warnings)


def write_report(out_dir: str | Path, *, title: str, results: dict[str, Any], ceiling: dict[str, Any] | None = None,
                 metrics_rows: Sequence[dict] = (), queries: Sequence[dict] = (), info: dict[str, Any] | None = None,
                 ks: Sequence[int] = (1, 5, 10)) -> tuple[Path, Path]:
    """Write ``report.html`` and ``results.json`` into ``out_dir``.

    ``queries`` items: ``{"audio": path, "transcript": str, "gold_image_id": str,
    "hits": [{"rank", "item_id", "path", "score"}, ...]}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curve = plot_training_curve(metrics_rows, out_dir / "training_curve.png")

    payload = {"title": title, "results": results, "ceiling": ceiling, "info": info or {},
               "queries": [dict(q) for q in queries]}
    json_path = out_dir / "results.json"
    write_text_atomic(json_path, json.dumps(payload, indent=2, default=str))

    parts = [
        "<!doctype html><html><head><meta charset=utf-8>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}",
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}",
        "tr.c td{color:#777;font-style:italic}.q{border-top:1px solid #ddd;padding:1em 0}",
        "p.w{color:#a40;font-weight:bold}",
        ".hits{display:flex;gap:8px}.hit{text-align:center;font-size:12px}.gold img{outline:4px solid #2a2}",
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Retrieval on the test split</h2>",
        *(["<h3>Coarse (embeddings only)</h3>", _recall_table(results["coarse"], ceiling, ks),
           "<h3>Coarse-to-fine (the best coarse candidates re-ranked by the fine scorer)</h3>"]
          if isinstance(results.get("coarse"), dict) else []),
        _recall_table(results, ceiling, ks),
        "<p>Recall in percent. speech → image: the gallery is the unique test images; image → speech: the gallery "
        "is every test caption and a query counts as a hit when any caption of its image is in the top K. "
        "The chance row is the expected recall of a random ranking of that gallery. "
        "The ceiling row is the best expected recall of a system that uses each caption's stated facts "
        "perfectly (captions true of several images leave ties).</p>",
    ]
    if info:
        parts.append("<h2>Run</h2><table>" + "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in info.items())
            + "</table>")
    if curve is not None:
        parts += ["<h2>Training</h2>", f"<img alt='training curve' src='{_data_uri(curve, 'image/png')}'>"]
    if queries:
        parts.append("<h2>Sample spoken queries (top 5 images)</h2>")
    for q in queries:
        audio = f"<audio controls src='{_data_uri(q['audio'], 'audio/wav')}'></audio>" if q.get("audio") else ""
        hits = []
        for h in q["hits"]:
            gold = " gold" if h["item_id"] == q.get("gold_image_id") else ""
            hits.append(f"<div class='hit{gold}'><img src='{_thumbnail_uri(h['path'])}'><br>#{h['rank']} "
                        f"{html.escape(str(h['item_id']))}<br>{h['score']:.3f}</div>")
        parts.append(f"<div class=q><b>“{html.escape(q.get('transcript') or '')}”</b><br>{audio}"
                     f"<div class=hits>{''.join(hits)}</div></div>")
    parts.append("<p>Green outline: the image the query was spoken about.</p></body></html>")
    html_path = out_dir / "report.html"
    write_text_atomic(html_path, "\n".join(parts))
    return html_path, json_path
