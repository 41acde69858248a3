"""Masked symmetric InfoNCE against a brute-force reference."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vgskit.losses import InfoNCELoss, masked_infonce_terms, unique_images


def _brute_force(speech: torch.Tensor, image: torch.Tensor, ids: list[int], scale: float) -> float:
    """Plain loops over the formulas in the losses module docstring."""
    n = len(ids)
    uniq: list[int] = []
    rows: list[int] = []
    for i, g in enumerate(ids):
        if g not in uniq:
            uniq.append(g)
            rows.append(i)

    def logit(i: int, j: int) -> float:
        return scale * float(speech[i] @ image[rows[j]])

    s2i = i2s = 0.0
    for i in range(n):
        j = uniq.index(ids[i])
        pos = logit(i, j)
        s2i += -pos + math.log(sum(math.exp(logit(i, jj)) for jj in range(len(uniq))))
        denom = math.exp(pos) + sum(math.exp(logit(k, j)) for k in range(n) if ids[k] != ids[i])
        i2s += -pos + math.log(denom)
    return 0.5 * (s2i / n + i2s / n)


def _batch(ids: list[int], dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    speech = F.normalize(torch.randn(len(ids), dim, generator=g), dim=-1)
    per_image = F.normalize(torch.randn(max(ids) + 1, dim, generator=g), dim=-1)
    ids_t = torch.tensor(ids)
    return speech, per_image[ids_t], ids_t


def test_matches_brute_force_with_repeated_images() -> None:
    ids = [3, 3, 0, 0, 7, 5, 5, 5, 1]  # pairs, a triple and singletons, not sorted
    speech, image, ids_t = _batch(ids)
    loss_fn = InfoNCELoss(init_temperature=0.2, learnable_temperature=False)
    got = float(loss_fn(speech, image, ids_t))
    assert math.isclose(got, _brute_force(speech, image, ids, 5.0), rel_tol=1e-5)


def test_without_ids_equals_clip_loss() -> None:
    speech, image, _ = _batch(list(range(6)))
    loss_fn = InfoNCELoss(init_temperature=0.1, learnable_temperature=False)
    logits = 10.0 * speech @ image.T
    target = torch.arange(6)
    expected = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    torch.testing.assert_close(loss_fn(speech, image), expected)


def test_same_image_captions_are_not_negatives() -> None:
    ids = torch.tensor([0, 0, 1, 1, 2])
    first, target = unique_images(ids)
    assert first.tolist() == [0, 2, 4] and target.tolist() == [0, 0, 1, 1, 2]
    logits = torch.randn(5, 3, requires_grad=True)
    _, i2s = masked_infonce_terms(logits, target)
    (grad,) = torch.autograd.grad(i2s[0], logits)
    assert grad[1, 0] == 0  # caption 1 shows image 0: removed from caption 0's denominator
    assert grad[2, 0] != 0 and grad[4, 0] != 0  # other images' captions are negatives
    assert grad[0, 0] != 0  # the positive itself
    # and the term is unchanged however large the masked logit is
    bumped = logits.detach().clone()
    bumped[1, 0] += 50.0
    torch.testing.assert_close(masked_infonce_terms(bumped, target)[1][0], i2s[0].detach())


def test_duplicate_image_rows_are_deduplicated() -> None:
    ids = [0, 0, 1, 1]
    speech, image, ids_t = _batch(ids)
    loss_fn = InfoNCELoss(learnable_temperature=False)
    base = loss_fn(speech, image, ids_t)
    corrupted = image.clone()
    corrupted[1] = -corrupted[1]  # a later copy of image 0: must be ignored
    torch.testing.assert_close(loss_fn(speech, corrupted, ids_t), base)


def test_single_image_batch_is_finite() -> None:
    speech, image, ids_t = _batch([0, 0, 0])
    loss = InfoNCELoss()(speech.requires_grad_(), image, ids_t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(speech.grad).all()


def test_temperature_learnable_fixed_and_clamped() -> None:
    speech, image, ids_t = _batch([0, 0, 1, 2])
    learn = InfoNCELoss()
    assert math.isclose(learn.scale().item(), 1 / 0.07, rel_tol=1e-5)
    learn(speech, image, ids_t).backward()
    assert learn.logit_scale.grad is not None and learn.logit_scale.grad.abs() > 0
    fixed = InfoNCELoss(learnable_temperature=False)
    assert not any(True for _ in fixed.parameters())
    with torch.no_grad():
        learn.logit_scale.fill_(10.0)  # exp(10) >> 100
    assert learn.scale().item() == 100.0


def test_loss_stays_float32_under_autocast() -> None:
    speech, image, ids_t = _batch([0, 0, 1, 2])
    loss_fn = InfoNCELoss()
    expected = loss_fn(speech, image, ids_t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_fn(speech, image, ids_t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
