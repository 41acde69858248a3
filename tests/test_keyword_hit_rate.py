"""Per-slot keyword hit rate, against a brute-force loop."""

from __future__ import annotations

import pytest
import torch

from vgskit.models.speechclip.metrics import keyword_hit_rate


def _brute(keywords, vocabulary, caption_tokens, ids, top):
    n, k, _ = keywords.shape
    hits = [0] * k
    for i in range(n):
        for s in range(k):
            sims = [float(torch.nn.functional.cosine_similarity(keywords[i, s], v, dim=0)) for v in vocabulary]
            best = sorted(range(len(sims)), key=lambda j: -sims[j])[:top]
            hits[s] += any(int(ids[j]) in set(caption_tokens[i]) for j in best)
    return [100.0 * h / n for h in hits]


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_matches_brute_force(chunk_size):
    g = torch.Generator().manual_seed(0)
    keywords = torch.randn(7, 4, 6, generator=g)
    vocabulary = torch.randn(20, 6, generator=g)
    ids = torch.arange(100, 120)
    caption_tokens = [torch.randint(100, 120, (5,), generator=g).tolist() for _ in range(7)]
    got = keyword_hit_rate(keywords, vocabulary, caption_tokens, ids, top=3, chunk_size=chunk_size)
    assert got.tolist() == pytest.approx(_brute(keywords, vocabulary, caption_tokens, ids, 3))


def test_exact_keywords_hit_and_scaled_ones_too():
    vocabulary = torch.eye(8)
    keywords = torch.stack([vocabulary[[1, 2]] * 3.0, vocabulary[[5, 6]]])  # [2, 2, 8]; cosine ignores scale
    rates = keyword_hit_rate(keywords, vocabulary, [[1, 7], [6]], top=1)
    assert rates.tolist() == [50.0, 50.0]  # slot 0: caption 0 hits (1), caption 1 misses (5 ∉ {6})
    with pytest.raises(ValueError, match="token sets"):
        keyword_hit_rate(keywords, vocabulary, [[1]], top=1)
    with pytest.raises(ValueError, match="top must be"):
        keyword_hit_rate(keywords, vocabulary, [[1], [2]], top=9)
