"""SpeechCLIP parity with the reference implementation's golden outputs (``tests/golden/speechclip_*``).

Each case loads the reference parameters through :func:`convert_speechclip_state_dict`, feeds the stored
inputs and compares outputs (and gradients of ``(y * cotangent).sum()``, or of the scalar loss) within the
case's recommended tolerance.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest
import torch
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from _golden import GOLDEN, case, section
from vgskit.encoders.pretrained_speech import WeightedLayerSum
from vgskit.encoders.text import ClipTextConfig, ClipTextEncoder
from vgskit.losses import InfoNCELoss
from vgskit.models.speechclip.blocks import (
    CascadedBranch,
    CascadedBranchConfig,
    CosineVectorQuantizer,
    KeywordBatchNorm,
    ParallelBranch,
    ParallelBranchConfig,
    convert_speechclip_state_dict,
    encode_keywords,
    key_padding_mask,
    speechclip_loss,
)
from vgskit.train.schedules import WarmupLinearDecay

try:  # its home since the schedules moved to vgskit.train.schedules
    from vgskit.train.schedules import SpeechClipWarmupDecay
except ImportError:
    from vgskit.models.speechclip import SpeechClipWarmupDecay

_case, _section = case, section


def _arg(t: dict[str, Tensor], text: str) -> Tensor:
    """The stored tensor a case's call argument names: ``"input.x"``, ``"input.x (a non-leaf copy)"``,
    ``"list(input.x.unbind(0))"`` or ``"std(input.token_embedding, dim=0)"``."""
    name = re.search(r"\b(?:input|param)\.[A-Za-z_]\w*", text)
    assert name is not None, text
    return t[name.group(0)]


def _training(meta: dict[str, Any]) -> bool:
    """Whether the case ran its module in training mode (``mode`` starts with "train" or "eval")."""
    mode = meta["mode"].split()[0]
    assert mode in ("train", "eval"), meta["mode"]
    return mode == "train"


def _fixed_temperature(spec: str) -> float:
    """The reference's ``temp: "fixed=0.1"`` (a fixed straight-through temperature) as a number."""
    kind, _, value = spec.partition("=")
    assert kind == "fixed", spec
    return float(value)


def _optimizer_lr(spec: str) -> float:
    """The learning rate of an optimizer the case names as ``"torch.optim.Adam(lr=0.0001, ...)"``."""
    m = re.search(r"\blr=([-+0-9.eE]+)", spec)
    assert m is not None, spec
    return float(m.group(1))


def _tol(meta: dict[str, Any]) -> dict[str, float]:
    rec = meta["tolerance"]["recommended"]
    return {"rtol": rec["rtol"], "atol": rec["atol"]}


def _close(actual: Tensor, expected: Tensor, tol: dict[str, float], what: str) -> None:
    torch.testing.assert_close(actual.detach(), expected, **tol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------------------
# Weighted layer sum, padding mask, loss, schedule
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["speechclip_weighted_sum", "speechclip_weighted_sum_normalized"])
def test_weighted_sum(case: str) -> None:
    t, meta = _case(case)
    tol = _tol(meta)
    args = meta["constructor_args"]
    m = WeightedLayerSum(args["n_weights"], layer_norm=args["normalize_features"])
    m.load_state_dict(convert_speechclip_state_dict(_section(t, "param.")))
    x = _arg(t, meta["call_args"]["x"]).clone().requires_grad_(True)  # [L, B, T, D]
    assert x.shape[0] == args["n_weights"]
    y = m(list(x.unbind(0)))  # [B, T, D]
    _close(y, t["output.y"], tol, "y")
    (y * t["input.cotangent"]).sum().backward()
    _close(x.grad, t["grad.x"], tol, "grad.x")
    _close(m.weights.grad, t["grad.weights"], tol, "grad.weights")


def test_key_padding_mask() -> None:
    t, meta = _case("speechclip_get_keypadding_mask")
    args = meta["call_args"]
    mask = key_padding_mask(_arg(t, args["data_lens"]), args["max_length"])
    assert mask.dtype == torch.bool
    assert torch.equal(mask, t["output.mask"])
    assert mask.int().tolist() == meta["outputs_json"]["mask"]


@pytest.mark.parametrize(
    "case", ["speechclip_masked_contrastive_loss_fixed_temp", "speechclip_masked_contrastive_loss_learnable_temp"]
)
def test_masked_contrastive_loss(case: str) -> None:
    t, meta = _case(case)
    tol = _tol(meta)
    ctor, args = meta["constructor_args"], meta["call_args"]
    # The reference options our loss implements: no margin, no decoupled form, both directions.
    assert (ctor["margin"], ctor["dcl"], ctor["a2b"], ctor["b2a"]) == (0.0, False, True, True)
    learnable = ctor["temperature_trainable"]
    loss_fn = speechclip_loss(learnable_temperature=learnable, init_temperature=ctor["temperature"])
    if learnable:
        loss_fn.load_state_dict(convert_speechclip_state_dict(_section(t, "param.")))
    # The fixed-scale reference multiplies by the Python float 1/temperature; our float32 log-scale buffer
    # gives that scale in float32.
    assert float(loss_fn.scale().detach()) == pytest.approx(1 / ctor["temperature"], rel=tol["rtol"])
    a = _arg(t, args["feat_A"]).clone().requires_grad_(True)
    b = _arg(t, args["feat_B"]).clone().requires_grad_(True)
    index = _arg(t, args["index"])
    loss = loss_fn(a, b, index)
    _close(loss, t["output.loss"], tol, "loss")
    loss.backward()
    _close(a.grad, t["grad.feat_A"], tol, "grad.feat_A")
    _close(b.grad, t["grad.feat_B"], tol, "grad.feat_B")
    if learnable:
        _close(loss_fn.logit_scale.grad, t["grad.temperature"], tol, "grad.temperature")
    with torch.no_grad():
        _close(loss_fn(a, b, None), t["output.loss_no_index"], tol, "loss_no_index")
        # The default (unique-image) form is a different loss when image rows of one image differ, as here.
        dedup = InfoNCELoss(init_temperature=ctor["temperature"], learnable_temperature=False)(a, b, index)
    assert not torch.allclose(dedup, t["output.loss"], **tol)


def test_linear_warmup_decay_schedule() -> None:
    t, meta = _case("speechclip_linear_warmup_decay")
    tol = _tol(meta)
    args = meta["constructor_args"]
    warmup, max_step, final_lr = args["warmup"], args["max_step"], args["final_lr"]
    lr = _optimizer_lr(args["optimizer"])  # the base lr the reference reads from its optimizer
    steps = t["input.steps"].tolist()
    # The stored curve is the one the case lists.
    assert {str(s): v for s, v in zip(steps, t["output.lr"].tolist(), strict=True)} == pytest.approx(
        meta["outputs_json"], rel=tol["rtol"], abs=tol["atol"])
    ref = SpeechClipWarmupDecay(warmup, max_step, lr, final_lr, hold_final=False)
    lam = torch.tensor([ref(s) for s in steps], dtype=torch.float64)
    torch.testing.assert_close(lam, t["output.lambda"], **tol)
    torch.testing.assert_close(lr * lam, t["output.lr"], **tol)

    # Default: identical over the configured run (steps < max_step), then held at final_lr, never negative.
    ours = SpeechClipWarmupDecay(warmup, max_step, lr, final_lr)
    for s, want in zip(steps, t["output.lr"].tolist(), strict=True):
        got = lr * ours(s)
        if s < max_step:
            assert got == pytest.approx(want, rel=tol["rtol"], abs=tol["atol"])
        else:
            assert got == pytest.approx(final_lr, rel=tol["rtol"]) and want < final_lr

    # The generic schedule is the same curve one step later (it starts at lr 0). It is not the reference's
    # formula: float rounding near the 1e-8 end makes it agree to ~1e-11 relative rather than to the case's
    # tolerance, hence a looser bound of its own.
    generic = WarmupLinearDecay(warmup, max_step, lr, final_lr)
    for s, want in zip(steps, t["output.lr"].tolist(), strict=True):
        if s < max_step:
            assert lr * generic(s + 1) == pytest.approx(want, rel=1e-9, abs=1e-18)


# --------------------------------------------------------------------------------------------------------
# Keyword BatchNorm and vector quantiser
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["speechclip_kw_batchnorm_eval", "speechclip_kw_batchnorm_train"])
def test_kw_batchnorm(case: str) -> None:
    t, meta = _case(case)
    tol = _tol(meta)
    ctor, args = meta["constructor_args"], meta["call_args"]
    assert (ctor["batchnorm_type"], ctor["parallel"]) == ("eachKw", True)  # the layout KeywordBatchNorm has
    assert args["seq_lens"] is None
    k, d = ctor["kw_num"], ctor["kw_dim"]
    params = _section(t, "param.")
    emb = _arg(t, ctor["init_scale"])  # [V, D]: the table the init statistics come from
    assert _arg(t, ctor["init_bias"]) is emb

    bn = KeywordBatchNorm(k, d, learnable=ctor["learnable"])
    bn.init_from_embeddings(emb, std_scale=ctor["std_scale"], reference_init=True)  # the reference's order
    torch.testing.assert_close(bn.bn.weight.detach(), params["bn_layer.weight"], rtol=0, atol=0)
    torch.testing.assert_close(bn.bn.bias.detach(), params["bn_layer.bias"], rtol=0, atol=0)
    bn.init_from_embeddings(emb, std_scale=ctor["std_scale"])  # ours: feature f = d*K + k, its own dim's stats
    std, mean = emb.std(dim=0) * ctor["std_scale"], emb.mean(dim=0)
    assert torch.equal(bn.bn.weight.detach().view(d, k), std[:, None].expand(d, k))
    assert torch.equal(bn.bn.bias.detach().view(d, k), mean[:, None].expand(d, k))
    assert not torch.equal(bn.bn.weight.detach(), params["bn_layer.weight"])

    bn.load_state_dict(convert_speechclip_state_dict(params))
    training = _training(meta)
    bn.train(training)
    x = _arg(t, args["keywords"]).clone().requires_grad_(True)
    assert x.shape[1:] == (k, d)
    y = bn(x)  # [B, K, D]
    _close(y, t["output.y"], tol, "y")
    (y * t["input.cotangent"]).sum().backward()
    _close(x.grad, t["grad.keywords"], tol, "grad.keywords")
    if training:
        _close(bn.bn.weight.grad, t["grad.bn_layer.weight"], tol, "grad.weight")
        _close(bn.bn.bias.grad, t["grad.bn_layer.bias"], tol, "grad.bias")
        state = _section(t, "output.state.bn_layer.")
        _close(bn.bn.running_mean, state["running_mean"], tol, "running_mean")
        _close(bn.bn.running_var, state["running_var"], tol, "running_var")
        assert int(bn.bn.num_batches_tracked) == int(state["num_batches_tracked"])


@pytest.mark.parametrize("case", ["speechclip_vq_eval", "speechclip_vq_train"])
def test_vector_quantizer(case: str) -> None:
    t, meta = _case(case)
    tol = _tol(meta)
    ctor, args = meta["constructor_args"], meta["call_args"]
    # What CosineVectorQuantizer implements: a fixed temperature, no Gumbel noise, a hard straight-through.
    assert (ctor["use_gumbel"], ctor["hard"], ctor["time_first"], args["produce_targets"]) == (False, True, True, True)
    vq = CosineVectorQuantizer(_fixed_temperature(ctor["temp"]))
    assert float(vq.temperature) == pytest.approx(meta["outputs_json"]["temp"], rel=tol["rtol"])
    vq.load_state_dict(convert_speechclip_state_dict(_section(t, "param.")))
    training = _training(meta)
    vq.train(training)
    masked = list(args["prob_msk"])
    stored = _arg(t, args["x"])
    assert stored.shape[-1] == meta["outputs_json"]["num_vars"]
    x = stored.clone().requires_grad_(True)
    out = vq(x, tuple(masked))
    assert torch.equal(out.targets, t["output.targets"])
    if not training:
        assert torch.equal(out.subword_prob, t["output.subword_prob"])  # exact one-hots
    _close(out.subword_prob, t["output.subword_prob"], tol, "subword_prob")
    for name in ("code_perplexity", "prob_perplexity", "ent_per_t", "diversity_loss"):
        _close(getattr(out, name), t[f"output.{name}"], tol, name)
    # Unlike the reference, the caller's scores are left untouched (its x_after_call has -inf columns).
    assert torch.equal(x.detach(), stored)
    assert torch.isinf(t["output.x_after_call"][..., masked]).all()
    if training:
        (out.subword_prob * t["input.cotangent"]).sum().backward()
        _close(x.grad, t["grad.x"], tol, "grad.x")
        assert (x.grad[..., masked] == 0).all()


# --------------------------------------------------------------------------------------------------------
# Branches
# --------------------------------------------------------------------------------------------------------


def _parallel_config(meta: dict[str, Any]) -> ParallelBranchConfig:
    ctor = meta["constructor_args"]
    pb = ctor["config"]["model_settings"]["parallel_branch"]
    ta = pb["transformer_args"]
    # The layer ParallelBranch builds: a post-norm, batch-first, GELU nn.TransformerEncoder of d_model width.
    assert pb["transformer_type"] == "TransformerEncoder"
    assert (ta["activation"], ta["norm_first"], ta["batch_first"]) == ("gelu", False, True)
    assert ta["d_model"] == ctor["audio_dim"]
    return ParallelBranchConfig(
        audio_dim=ctor["audio_dim"],
        out_dim=ctor["out_dim"],
        num_layers=ta["n_layers"],
        num_heads=ta["nhead"],
        ffn_dim=ta["dim_feedforward"],
        dropout=ta["dropout"],
        layer_norm_eps=ta["layer_norm_eps"],
        projection=pb["need_projection"],
    )


def test_parallel_branch() -> None:
    t, meta = _case("speechclip_parallel_branch_transformer")
    tol = _tol(meta)
    branch = ParallelBranch(_parallel_config(meta))
    branch.load_state_dict(convert_speechclip_state_dict(_section(t, "param.")))
    branch.train(_training(meta))
    lengths = _arg(t, meta["call_args"]["audio_len"])
    feats = _arg(t, meta["call_args"]["audio_feat"]).clone().requires_grad_(True)
    out = branch(feats, lengths)  # [B, out_dim]
    _close(out, t["output.out"], tol, "out")
    (out * t["input.cotangent"]).sum().backward()
    _close(feats.grad, t["grad.audio_feat"], tol, "grad.audio_feat")
    _close(branch.cls.grad, t["grad.cls"], tol, "grad.cls")

    mask = key_padding_mask(lengths + 1, feats.shape[1] + 1)
    assert torch.equal(mask, t["output.key_padding_mask"])
    valid = ~mask  # [B, 1+T]
    with torch.no_grad():
        _close(branch(feats, lengths), t["output.out_nograd"], tol, "out_nograd")
        enc_nograd = branch.encode(feats, lengths)
        states = branch.hidden_states(feats, lengths)
    enc = branch.encode(feats, lengths)
    # Padded positions are arbitrary (the reference's no_grad fast path sets them to the norm bias).
    _close(enc[valid], t["output.encoder_out"][valid], tol, "encoder_out")
    _close(enc_nograd[valid], t["output.encoder_out_nograd"][valid], tol, "encoder_out_nograd")
    _close(torch.stack(states), t["output.hidden_states"], tol, "hidden_states")


def _cascaded_config(meta: dict[str, Any]) -> CascadedBranchConfig:
    ctor = meta["constructor_args"]
    cb = ctor["config"]["model_settings"]["cascaded_branch"]
    ta, kw, vq = cb["transformer_args"], cb["keyword"], cb["vq"]
    # The blocks CascadedBranch builds: one attention + LayerNorm block (no feed-forward), a keyword
    # BatchNorm over every (slot, dim) before a hard, Gumbel-free cosine quantiser.
    assert (cb["type"], cb["transformer_type"]) == ("KW_CascadedBranch", "MultiheadAttentionAndNorm")
    assert (ta["batch_first"], ta["d_model"]) == (True, ctor["audio_dim"])
    assert (kw["batchnorms"]["type"], kw["batchnorms"]["parallel"], kw["retrieve_method"]) == ("eachKw", True, "cosine")
    assert (vq["type"], vq["bn_before_vq"], vq["args"]["use_gumbel"], vq["args"]["hard"]) == (
        "SimpleVectorQuantizer", True, False, True)
    vocab_size, text_dim = meta["tensors"]["param.clip.model.token_embedding.weight"]["shape"]
    assert text_dim == ctor["text_dim"]
    # The masked vocabulary ids are stated in the case's semantics ("VQ masks ids 0,2,3 ...").
    masked = next(re.search(r"VQ masks ids ([\d,]+)", line) for line in meta["semantics"] if "VQ masks ids" in line)
    return CascadedBranchConfig(
        audio_dim=ctor["audio_dim"],
        text_dim=ctor["text_dim"],
        vocab_size=vocab_size,
        num_keywords=kw["number"],
        num_heads=ta["nhead"],
        dropout=ta["dropout"],
        layer_norm_eps=ta["layer_norm_eps"],
        vq_temperature=_fixed_temperature(vq["args"]["temp"]),
        masked_ids=tuple(int(i) for i in masked.group(1).split(",")),
        bn_learnable=kw["batchnorms"]["learnable"],
        bn_std_scale=kw["batchnorms"]["std_scale"],
        bn_reference_init=True,
    )


@pytest.mark.parametrize("case", ["speechclip_cascaded_branch_eval", "speechclip_cascaded_branch_train"])
def test_cascaded_branch(case: str) -> None:
    t, meta = _case(case)
    tol = _tol(meta)
    params = _section(t, "param.")
    vocab = params["clip.model.token_embedding.weight"]  # [V, D], the reduced vocabulary
    cfg = _cascaded_config(meta)
    branch = CascadedBranch(cfg)
    branch.load_state_dict(convert_speechclip_state_dict(params))

    # The reference BatchNorm init (flag on) is what the stored parameters hold; ours differs.
    branch.init_batchnorm()
    assert torch.equal(branch.batchnorm.bn.weight.detach(), params["bn_layer.bn_layer.weight"])
    assert torch.equal(branch.batchnorm.bn.bias.detach(), params["bn_layer.bn_layer.bias"])
    ours = CascadedBranch(CascadedBranchConfig(**{**cfg.__dict__, "bn_reference_init": False}))
    ours.load_state_dict(branch.state_dict())
    ours.init_batchnorm()
    assert not torch.equal(ours.batchnorm.bn.weight, branch.batchnorm.bn.weight)
    branch.load_state_dict(convert_speechclip_state_dict(params))

    training = _training(meta)
    branch.train(training)
    args = meta["call_args"]
    lengths = _arg(t, args["audio_len"])
    feats = _arg(t, args["audio_feat"]).clone().requires_grad_(True)
    out = branch(feats, lengths)
    k = cfg.num_keywords
    mask = key_padding_mask(lengths + k, feats.shape[1] + k)
    assert torch.equal(mask, t["output.key_padding_mask"])
    _close(out.attention_out, t["output.self_att_out"], tol, "self_att_out")
    _close(out.kw_proj, t["output.kw_proj"], tol, "kw_proj")
    _close(out.kw_bn, t["output.kw_bn"], tol, "kw_bn")
    _close(out.cos_score, t["output.cos_score"], tol, "cos_score")
    assert torch.equal(out.vq.targets, t["output.targets"])
    _close(out.vq.subword_prob, t["output.subword_prob"], tol, "subword_prob")
    _close(out.keywords, t["output.keywords"], tol, "keywords")
    if training:
        state = _section(t, "output.state.bn_layer.bn_layer.")
        _close(branch.batchnorm.bn.running_mean, state["running_mean"], tol, "running_mean")
        _close(branch.batchnorm.bn.running_var, state["running_var"], tol, "running_var")
        (out.keywords * t["input.cotangent"]).sum().backward()
        _close(feats.grad, t["grad.audio_feat"], tol, "grad.audio_feat")
        _close(branch.cls.grad, t["grad.cls"], tol, "grad.cls")
    else:
        # Eval keywords are exactly vocabulary rows.
        assert torch.equal(out.keywords, vocab[out.vq.targets.squeeze(-1)])


# --------------------------------------------------------------------------------------------------------
# Frozen towers, checkpoint conversion
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_text(tmp_path_factory: pytest.TempPathFactory) -> ClipTextEncoder:
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=12,
        bos_token_id=48,
        eos_token_id=49,
    )
    folder = tmp_path_factory.mktemp("clip_text")
    CLIPTextModelWithProjection(cfg).save_pretrained(folder)
    return ClipTextEncoder(ClipTextConfig(str(folder), local_files_only=True))


def test_only_trainable_parts_get_gradients(tiny_clip_text: ClipTextEncoder) -> None:
    text = tiny_clip_text
    torch.manual_seed(1)
    layer_sum = WeightedLayerSum(3)
    parallel = ParallelBranch(ParallelBranchConfig(audio_dim=24, out_dim=12, num_heads=4, ffn_dim=32))
    cascaded = CascadedBranch(
        CascadedBranchConfig(
            audio_dim=24, text_dim=16, vocab_size=50, num_keywords=4, masked_ids=(0, 48, 49)
        ),
        token_embedding=text.token_embedding,
    )
    loss_fn = speechclip_loss(learnable_temperature=True)
    trainable = [layer_sum, parallel, cascaded, loss_fn]
    for m in [*trainable, text]:
        m.train()
    assert not text.training  # a frozen tower stays in eval mode
    # The shared vocabulary is neither a parameter nor a state-dict entry of the branch.
    assert not any(k.startswith("token_embedding") for k in cascaded.state_dict())
    assert all(p is not text.token_embedding.weight for p in cascaded.parameters())

    states = torch.randn(3, 6, 10, 24)  # [L, B, T, d] hidden states of a frozen speech tower
    lengths = torch.tensor([10, 7, 4, 9, 10, 3])
    image = torch.nn.functional.normalize(torch.randn(6, 12), dim=-1)
    image_ids = torch.tensor([0, 0, 1, 2, 2, 3])
    feats = layer_sum(states)  # [B, T, d]
    p = torch.nn.functional.normalize(parallel(feats, lengths), dim=-1)  # [B, 12]
    kw = cascaded(feats, lengths)
    c = torch.nn.functional.normalize(encode_keywords(text, kw.keywords, 48, 49), dim=-1)  # [B, 12]
    loss = loss_fn(p, image, image_ids) + loss_fn(c, image, image_ids)
    loss.backward()

    assert all(p.grad is None for p in text.parameters())
    for m in trainable:
        for name, param in m.named_parameters():
            assert param.requires_grad, name
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{type(m).__name__}.{name}"
    # Keywords enter CLIP's text tower exactly as [SOT, kw.., EOT] token embeddings would.
    with torch.no_grad():
        cascaded.eval()
        kw = cascaded(feats, lengths)
        ids = torch.cat(
            [torch.full((6, 1), 48), kw.vq.targets.squeeze(-1), torch.full((6, 1), 49)], dim=1
        )  # [B, K+2]
        torch.testing.assert_close(encode_keywords(text, kw.keywords, 48, 49), text(ids).pooled)


def test_convert_full_checkpoint() -> None:
    par, _ = _case("speechclip_parallel_branch_transformer")
    cas, meta = _case("speechclip_cascaded_branch_eval")
    ref: dict[str, Tensor] = {f"parallel_branch.{k}": v for k, v in _section(par, "param.").items()}
    ref.update({f"cascaded_branch.{k}": v for k, v in _section(cas, "param.").items()})
    ref["cascaded_branch.clip.model.positional_embedding"] = torch.zeros(3, meta["constructor_args"]["text_dim"])
    ref["clip.model.token_embedding.weight"] = ref["cascaded_branch.clip.model.token_embedding.weight"]
    ref["audio_encoder.encoder.layer.weight"] = torch.zeros(2)
    ref["audio_encoder.weightedsum_layer.weights"] = torch.zeros(13)
    ref["criterion.temperature"] = torch.tensor(math.log(1 / 0.07))
    out = convert_speechclip_state_dict(ref)

    pmeta = json.loads((GOLDEN / "speechclip_parallel_branch_transformer.json").read_text())
    parallel = ParallelBranch(_parallel_config(pmeta))
    cascaded = CascadedBranch(_cascaded_config(meta))
    parallel.load_state_dict({k[len("parallel.") :]: v for k, v in out.items() if k.startswith("parallel.")})
    cascaded.load_state_dict({k[len("cascaded.") :]: v for k, v in out.items() if k.startswith("cascaded.")})
    assert out["layer_sum.weights"].shape == (13,) and "loss.logit_scale" in out
    assert not any(k.startswith(("clip.", "audio_encoder.")) for k in out)
    with pytest.raises(KeyError, match="mystery"):
        convert_speechclip_state_dict({"parallel_branch.mystery": torch.zeros(1)})
