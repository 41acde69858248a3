"""FaST-VGS audio stage, region encoder and margin InfoNCE against the reference's golden outputs.

Each case's parameters are loaded through our reference key maps; every size and constant is read from the
case (constructor arguments, semantics notes, tensor shapes), and every ``output.*`` (train-mode BatchNorm
buffers included) and ``grad.*`` is compared within the case's ``tolerance.recommended``.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from _golden import case, section
from vgskit.errors import ConfigError
from vgskit.models.fast_vgs.audio import (
    ResDAVEnet,
    ResDAVEnetConfig,
    load_resdavenet_reference_state_dict,
    resdavenet_key_from_reference,
    resdavenet_output_frames,
)
from vgskit.models.fast_vgs.losses import MarginInfoNCEConfig, MarginInfoNCELoss, margin_infonce_loss
from vgskit.models.fast_vgs.regions import (
    RegionEncoder,
    RegionEncoderConfig,
    load_region_encoder_reference_state_dict,
)

_case, _section = case, section


def _tol(meta: dict[str, Any]) -> dict[str, float]:
    rec = meta["tolerance"]["recommended"]
    return {"rtol": rec["rtol"], "atol": rec["atol"]}


def _training(meta: dict[str, Any]) -> bool:
    mode = meta["mode"].split()[0]
    assert mode in ("train", "eval"), meta["mode"]
    return mode == "train"


def _semantic_number(meta: dict[str, Any], pattern: str) -> float:
    """A constant stated in the case's semantics notes (e.g. ``stride 2``, ``LN_1e-12``)."""
    for line in meta["semantics"]:
        match = re.search(pattern, line)
        if match is not None:
            return float(match.group(1))
    raise AssertionError(f"no {pattern!r} in the semantics of {meta['case']}")


def _check(name: str, ours: Tensor, ref: Tensor, tol: dict[str, float], errors: dict[str, float]) -> None:
    assert ours.shape == ref.shape, name
    if ref.is_floating_point():
        errors[name] = (ours.detach() - ref).abs().max().item()
        torch.testing.assert_close(ours.detach(), ref, **tol, msg=lambda m: f"{name}: {m}")
    else:
        assert torch.equal(ours, ref), name


# --- ResDAVEnet -----------------------------------------------------------------------------------------------


def _resdavenet_config(meta: dict[str, Any]) -> ResDAVEnetConfig:
    args = meta["constructor_args"]
    assert args["block"] == "SpeechBasicBlock"
    stride = int(_semantic_number(meta, r"first has stride (\d+)"))
    return ResDAVEnetConfig(
        in_dim=args["feat_dim"],
        widths=tuple(args["layer_widths"]),
        blocks_per_stage=tuple(args["layers"]),
        strides=(stride,) * len(args["layers"]),
        kernel_size=args["convsize"],
    )


@pytest.mark.parametrize("case", ["fastvgs_resdavenet_tiny_train", "fastvgs_resdavenet_tiny_eval"])
def test_resdavenet_golden(case: str) -> None:
    t, meta = _case(case)
    tol = _tol(meta)
    cfg = _resdavenet_config(meta)
    model = ResDAVEnet(cfg)
    load_resdavenet_reference_state_dict(model, _section(t, "param."))
    model.train(_training(meta))

    x = t["input.x"].clone().requires_grad_(True)
    y = model(x)
    assert y.shape[1] == resdavenet_output_frames(x.shape[1], cfg.strides)
    errors: dict[str, float] = {}
    _check("output.y", y, t["output.y"], tol, errors)
    (y * t["input.cotangent"]).sum().backward()
    _check("grad.x", x.grad, t["grad.x"], tol, errors)

    states = _section(t, "output.state.")
    assert bool(states) == model.training  # buffers after the call are stored for the train-mode case
    buffers = dict(model.named_buffers())
    for ref_key, value in states.items():
        name = resdavenet_key_from_reference(ref_key)
        assert name is not None, ref_key
        _check(f"output.state.{ref_key}", buffers[name], value, tol, errors)
    print(f"{case}: max abs error {max(errors.values()):.3g} (atol {tol['atol']}, rtol {tol['rtol']})")


def test_resdavenet_refuses_wrong_keys() -> None:
    t, meta = _case("fastvgs_resdavenet_tiny_eval")
    params = _section(t, "param.")
    model = ResDAVEnet(_resdavenet_config(meta))
    broken = dict(params)
    del broken["layer2.0.downsample.1.running_var"]
    broken["layer5.0.conv1.weight"] = params["layer1.0.conv1.weight"]
    broken["encoder.extra"] = params["linear.bias"]
    with pytest.raises(ConfigError) as err:
        load_resdavenet_reference_state_dict(model, broken)
    message = str(err.value)
    assert "stages.1.0.shortcut.1.running_var" in message
    assert "layer5.0.conv1.weight" in message and "encoder.extra" in message


# --- Region encoder ---------------------------------------------------------------------------------------------


def _region_config(meta: dict[str, Any]) -> RegionEncoderConfig:
    cfg = meta["constructor_args"]["config"]
    return RegionEncoderConfig(
        feat_dim=cfg["visual_feat_dim"],
        box_dim=cfg["visual_pos_dim"],
        hidden_size=cfg["hidden_size"],
        dropout=cfg["hidden_dropout_prob"],
        layer_norm_eps=_semantic_number(meta, r"LN_([0-9.eE+-]+)\("),
    )


def test_region_encoder_golden() -> None:
    t, meta = _case("fastvgs_visual_feat_encoder")
    tol = _tol(meta)
    model = RegionEncoder(_region_config(meta))
    load_region_encoder_reference_state_dict(model, _section(t, "param."))
    model.train(_training(meta))

    feats = t["input.feats"].clone().requires_grad_(True)
    boxes = t["input.boxes"].clone().requires_grad_(True)
    errors: dict[str, float] = {}
    y = model(feats, boxes)
    _check("output.y", y, t["output.y"], tol, errors)
    (y * t["input.cotangent"]).sum().backward()
    _check("grad.feats", feats.grad, t["grad.feats"], tol, errors)
    _check("grad.boxes", boxes.grad, t["grad.boxes"], tol, errors)
    with torch.no_grad():
        _check("output.y_no_boxes", model(t["input.feats"]), t["output.y_no_boxes"], tol, errors)
    print(f"fastvgs_visual_feat_encoder: max abs error {max(errors.values()):.3g} (atol {tol['atol']})")


def test_region_encoder_refuses_wrong_keys() -> None:
    t, meta = _case("fastvgs_visual_feat_encoder")
    params = _section(t, "param.")
    broken = {k: v for k, v in params.items() if k != "box_layer_norm.bias"}
    broken["visn_fc.scale"] = params["visn_fc.bias"]
    with pytest.raises(ConfigError) as err:
        load_region_encoder_reference_state_dict(RegionEncoder(_region_config(meta)), broken)
    assert "box_norm.bias" in str(err.value) and "visn_fc.scale" in str(err.value)


# --- Margin InfoNCE -------------------------------------------------------------------------------------------


def _plain_margin_infonce(scores: Tensor, image_ids: Tensor | None, margin: float) -> Tensor:
    """Paper eq. (1) written out with explicit sums, float64: for each pair i, in both directions,
    ``-log( e^{s_ii - δ} / (e^{s_ii - δ} + Σ_{j: img_j ≠ img_i} e^{s_ij}) )``, averaged over i; directions summed."""
    s = scores.double()
    n = s.shape[0]
    ids = image_ids if image_ids is not None else torch.arange(n)
    total = torch.zeros((), dtype=torch.float64)
    for mat in (s, s.t()):
        for i in range(n):
            pos = torch.exp(mat[i, i] - margin)
            neg = sum(
                (torch.exp(mat[i, j]) for j in range(n) if j != i and ids[j] != ids[i]), torch.tensor(0.0)
            )
            total = total - torch.log(pos / (pos + neg)) / n
    return total


def test_margin_infonce_golden() -> None:
    t, meta = _case("fastvgs_margin_infonce_loss")
    tol = _tol(meta)
    margin = float(meta["call_args"]["margin"])
    assert _semantic_number(meta, r"get (-?\d+) added") == MarginInfoNCEConfig().mask_value
    errors: dict[str, float] = {}

    scores = t["input.S"].clone().requires_grad_(True)
    loss = margin_infonce_loss(scores, t["input.img_id"], margin=margin)
    _check("output.loss", loss, t["output.loss"], tol, errors)
    assert loss.item() == pytest.approx(meta["outputs_json"]["loss"], rel=tol["rtol"], abs=tol["atol"])
    loss.backward()
    _check("grad.S", scores.grad, t["grad.S"], tol, errors)

    module = MarginInfoNCELoss(MarginInfoNCEConfig(margin=margin))
    _check("output.loss_no_img_id", module(t["input.S"]), t["output.loss_no_img_id"], tol, errors)
    print(f"fastvgs_margin_infonce_loss: max abs error {max(errors.values()):.3g} (atol {tol['atol']})")


def test_margin_infonce_matches_plain_equation() -> None:
    t, meta = _case("fastvgs_margin_infonce_loss")
    margin = float(meta["call_args"]["margin"])
    scores, ids = t["input.S"], t["input.img_id"]
    assert len(set(ids.tolist())) < len(ids)  # the case does exercise same-image masking
    for image_ids in (ids, None):
        ours = margin_infonce_loss(scores, image_ids, margin=margin)
        plain = _plain_margin_infonce(scores, image_ids, margin)
        assert ours.item() == pytest.approx(plain.item(), rel=1e-5, abs=1e-6)
    # Margin and masking both matter: a margin-free, unmasked loss is a different number.
    plain_ce = F.cross_entropy(scores, torch.arange(len(ids))) + F.cross_entropy(
        scores.t(), torch.arange(len(ids))
    )
    assert abs(plain_ce.item() - margin_infonce_loss(scores, ids, margin=margin).item()) > 1e-3


def test_margin_infonce_rejects_non_square() -> None:
    with pytest.raises(ValueError, match="square"):
        margin_infonce_loss(torch.zeros(3, 4))
