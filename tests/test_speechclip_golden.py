"""SpeechCLIP parity with the reference implementation's golden outputs (``tests/golden/speechclip_*``).

Each case loads the reference parameters through :func:`convert_speechclip_state_dict`, feeds the stored
inputs and compares outputs (and gradients of ``(y * cotangent).sum()``, or of the scalar loss) within the
case's recommended tolerance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from vgskit.encoders.pretrained_speech import WeightedLayerSum
from vgskit.encoders.text import ClipTextConfig, ClipTextEncoder
from vgskit.losses import InfoNCELoss
from vgskit.models.speechclip import (
    CascadedBranch,
    CascadedBranchConfig,
    CosineVectorQuantizer,
    KeywordBatchNorm,
    ParallelBranch,
    ParallelBranchConfig,
    SpeechClipWarmupDecay,
    convert_speechclip_state_dict,
    encode_keywords,
    key_padding_mask,
    speechclip_loss,
)
from vgskit.train.schedules import WarmupLinearDecay

GOLDEN = Path(__file__).parent / "golden"


def _case(name: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = load_file(str(GOLDEN / f"{name}.safetensors"))
    meta = json.loads((GOLDEN / f"{name}.json").read_text())
    return tensors, meta


def _section(t: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}


def _tol(meta: dict[str, Any]) -> dict[str, float]:
    rec = meta["tolerance"]["recommended"]
    return {"rtol": rec["rtol"], "atol": rec["atol"]}


def _close(actual: Tensor, expected: Tensor, tol: dict[str, float], what: str) -> None:
    torch.testing.assert_close(actual.detach(), expected, **tol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------------------
# Weighted layer sum, padding mask, loss, schedule
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "layer_norm"), [("speechclip_weighted_sum", False), ("speechclip_weighted_sum_normalized", True)]
)
def test_weighted_sum(case: str, layer_norm: bool) -> None:
    t, meta = _case(case)
    tol = _tol(meta)
    m = WeightedLayerSum(meta["constructor_args"]["n_weights"], layer_norm=layer_norm)
    m.load_state_dict(convert_speechclip_state_dict(_section(t, "param.")))
    x = t["input.x"].clone().requires_grad_(True)
    y = m(list(x.unbind(0)))  # [B, T, D]
    _close(y, t["output.y"], tol, "y")
    (y * t["input.cotangent"]).sum().backward()
    _close(x.grad, t["grad.x"], tol, "grad.x")
    _close(m.weights.grad, t["grad.weights"], tol, "grad.weights")


def test_key_padding_mask() -> None:
    t, meta = _case("speechclip_get_keypadding_mask")
    mask = key_padding_mask(t["input.data_lens"], meta["call_args"]["max_length"])
    assert mask.dtype == torch.bool
    assert torch.equal(mask, t["output.mask"])


@pytest.mark.parametrize("learnable", [False, True])
def test_masked_contrastive_loss(learnable: bool) -> None:
    name = "learnable" if learnable else "fixed"
    t, meta = _case(f"speechclip_masked_contrastive_loss_{name}_temp")
    tol = _tol(meta)
    loss_fn = speechclip_loss(learnable_temperature=learnable)
    if learnable:
        loss_fn.load_state_dict(convert_speechclip_state_dict(_section(t, "param.")))
    # The fixed-scale reference multiplies by the Python float 1/0.07; our float32 log-scale buffer gives
    # the same float32 scale.
    assert float(loss_fn.scale().detach()) == pytest.approx(1 / 0.07, rel=1e-6)
    a = t["input.feat_A"].clone().requires_grad_(True)
    b = t["input.feat_B"].clone().requires_grad_(True)
    loss = loss_fn(a, b, t["input.index"])
    _close(loss, t["output.loss"], tol, "loss")
    loss.backward()
    _close(a.grad, t["grad.feat_A"], tol, "grad.feat_A")
    _close(b.grad, t["grad.feat_B"], tol, "grad.feat_B")
    if learnable:
        _close(loss_fn.logit_scale.grad, t["grad.temperature"], tol, "grad.temperature")
    with torch.no_grad():
        _close(loss_fn(a, b, None), t["output.loss_no_index"], tol, "loss_no_index")
        # The default (unique-image) form is a different loss when image rows of one image differ, as here.
        dedup = InfoNCELoss(learnable_temperature=False)(a, b, t["input.index"])
    assert not torch.allclose(dedup, t["output.loss"], **tol)


def test_linear_warmup_decay_schedule() -> None:
    t, meta = _case("speechclip_linear_warmup_decay")
    tol = _tol(meta)
    args = meta["constructor_args"]
    warmup, max_step, final_lr, lr = args["warmup"], args["max_step"], args["final_lr"], 1e-4
    steps = t["input.steps"].tolist()
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
            assert got == pytest.approx(final_lr, rel=1e-12) and want < final_lr

    # The generic schedule is the same curve one step later (it starts at lr 0); float rounding near the
    # 1e-8 end makes it agree to ~1e-11 relative rather than bit for bit.
    generic = WarmupLinearDecay(warmup, max_step, lr, final_lr)
    for s, want in zip(steps, t["output.lr"].tolist(), strict=True):
        if s < max_step:
            assert lr * generic(s + 1) == pytest.approx(want, rel=1e-9, abs=1e-18)


# --------------------------------------------------------------------------------------------------------
# Keyword BatchNorm and vector quantiser
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_kw_batchnorm(mode: str) -> None:
    t, meta = _case(f"speechclip_kw_batchnorm_{mode}")
    tol = _tol(meta)
    k, d = meta["constructor_args"]["kw_num"], meta["constructor_args"]["kw_dim"]
    params = _section(t, "param.")
    emb = t["input.token_embedding"]  # [V, D]

    bn = KeywordBatchNorm(k, d)
    bn.init_from_embeddings(emb, reference_init=True)  # the reference's repeat order
    torch.testing.assert_close(bn.bn.weight.detach(), params["bn_layer.weight"], rtol=0, atol=0)
    torch.testing.assert_close(bn.bn.bias.detach(), params["bn_layer.bias"], rtol=0, atol=0)
    bn.init_from_embeddings(emb)  # ours: feature f = d*K + k starts from its own dim d's statistics
    std, mean = emb.std(dim=0), emb.mean(dim=0)
    assert torch.equal(bn.bn.weight.detach().view(d, k), std[:, None].expand(d, k))
    assert torch.equal(bn.bn.bias.detach().view(d, k), mean[:, None].expand(d, k))
    assert not torch.equal(bn.bn.weight.detach(), params["bn_layer.weight"])

    bn.load_state_dict(convert_speechclip_state_dict(params))
    bn.train(mode == "train")
    x = t["input.keywords"].clone().requires_grad_(True)
    y = bn(x)  # [B, K, D]
    _close(y, t["output.y"], tol, "y")
    (y * t["input.cotangent"]).sum().backward()
    _close(x.grad, t["grad.keywords"], tol, "grad.keywords")
    if mode == "train":
        _close(bn.bn.weight.grad, t["grad.bn_layer.weight"], tol, "grad.weight")
        _close(bn.bn.bias.grad, t["grad.bn_layer.bias"], tol, "grad.bias")
        state = _section(t, "output.state.bn_layer.")
        _close(bn.bn.running_mean, state["running_mean"], tol, "running_mean")
        _close(bn.bn.running_var, state["running_var"], tol, "running_var")
        assert int(bn.bn.num_batches_tracked) == int(state["num_batches_tracked"])


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_vector_quantizer(mode: str) -> None:
    t, meta = _case(f"speechclip_vq_{mode}")
    tol = _tol(meta)
    vq = CosineVectorQuantizer()
    vq.load_state_dict(convert_speechclip_state_dict(_section(t, "param.")))
    vq.train(mode == "train")
    x = t["input.x"].clone().requires_grad_(True)
    out = vq(x, (0, 2, 3))
    assert torch.equal(out.targets, t["output.targets"])
    if mode == "eval":
        assert torch.equal(out.subword_prob, t["output.subword_prob"])  # exact one-hots
    _close(out.subword_prob, t["output.subword_prob"], tol, "subword_prob")
    for name in ("code_perplexity", "prob_perplexity", "ent_per_t", "diversity_loss"):
        _close(getattr(out, name), t[f"output.{name}"], tol, name)
    # Unlike the reference, the caller's scores are left untouched (its x_after_call has -inf columns).
    assert torch.equal(x.detach(), t["input.x"])
    assert torch.isinf(t["output.x_after_call"][..., [0, 2, 3]]).all()
    if mode == "train":
        (out.subword_prob * t["input.cotangent"]).sum().backward()
        _close(x.grad, t["grad.x"], tol, "grad.x")
        assert (x.grad[..., [0, 2, 3]] == 0).all()


# --------------------------------------------------------------------------------------------------------
# Branches
# --------------------------------------------------------------------------------------------------------


def _parallel_config(meta: dict[str, Any]) -> ParallelBranchConfig:
    ta = meta["constructor_args"]["config"]["model_settings"]["parallel_branch"]["transformer_args"]
    return ParallelBranchConfig(
        audio_dim=meta["constructor_args"]["audio_dim"],
        out_dim=meta["constructor_args"]["out_dim"],
        num_layers=ta["n_layers"],
        num_heads=ta["nhead"],
        ffn_dim=ta["dim_feedforward"],
        dropout=ta["dropout"],
        layer_norm_eps=ta["layer_norm_eps"],
    )


def test_parallel_branch() -> None:
    t, meta = _case("speechclip_parallel_branch_transformer")
    tol = _tol(meta)
    branch = ParallelBranch(_parallel_config(meta))
    branch.load_state_dict(convert_speechclip_state_dict(_section(t, "param.")))
    branch.eval()
    lengths = t["input.audio_len"]
    feats = t["input.audio_feat"].clone().requires_grad_(True)
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


def _cascaded_config(meta: dict[str, Any], vocab: Tensor) -> CascadedBranchConfig:
    cb = meta["constructor_args"]["config"]["model_settings"]["cascaded_branch"]
    ta = cb["transformer_args"]
    return CascadedBranchConfig(
        audio_dim=ta["d_model"],
        text_dim=vocab.shape[1],
        vocab_size=vocab.shape[0],
        num_keywords=cb["keyword"]["number"],
        num_heads=ta["nhead"],
        dropout=ta["dropout"],
        layer_norm_eps=ta["layer_norm_eps"],
        bn_std_scale=cb["keyword"]["batchnorms"]["std_scale"],
        bn_reference_init=True,
    )


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_cascaded_branch(mode: str) -> None:
    t, meta = _case(f"speechclip_cascaded_branch_{mode}")
    tol = _tol(meta)
    params = _section(t, "param.")
    vocab = params["clip.model.token_embedding.weight"]  # [V, D], the reduced vocabulary
    cfg = _cascaded_config(meta, vocab)
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

    branch.train(mode == "train")
    feats = t["input.audio_feat"].clone().requires_grad_(True)
    out = branch(feats, t["input.audio_len"])
    k = cfg.num_keywords
    mask = key_padding_mask(t["input.audio_len"] + k, feats.shape[1] + k)
    assert torch.equal(mask, t["output.key_padding_mask"])
    _close(out.attention_out, t["output.self_att_out"], tol, "self_att_out")
    _close(out.kw_proj, t["output.kw_proj"], tol, "kw_proj")
    _close(out.kw_bn, t["output.kw_bn"], tol, "kw_bn")
    _close(out.cos_score, t["output.cos_score"], tol, "cos_score")
    assert torch.equal(out.vq.targets, t["output.targets"])
    _close(out.vq.subword_prob, t["output.subword_prob"], tol, "subword_prob")
    _close(out.keywords, t["output.keywords"], tol, "keywords")
    if mode == "train":
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
    ref["cascaded_branch.clip.model.positional_embedding"] = torch.zeros(3, 16)
    ref["clip.model.token_embedding.weight"] = ref["cascaded_branch.clip.model.token_embedding.weight"]
    ref["audio_encoder.encoder.layer.weight"] = torch.zeros(2)
    ref["audio_encoder.weightedsum_layer.weights"] = torch.zeros(13)
    ref["criterion.temperature"] = torch.tensor(math.log(1 / 0.07))
    out = convert_speechclip_state_dict(ref)

    pmeta = json.loads((GOLDEN / "speechclip_parallel_branch_transformer.json").read_text())
    vocab = ref["clip.model.token_embedding.weight"]
    parallel = ParallelBranch(_parallel_config(pmeta))
    cascaded = CascadedBranch(_cascaded_config(meta, vocab))
    parallel.load_state_dict({k[len("parallel.") :]: v for k, v in out.items() if k.startswith("parallel.")})
    cascaded.load_state_dict({k[len("cascaded.") :]: v for k, v in out.items() if k.startswith("cascaded.")})
    assert out["layer_sum.weights"].shape == (13,) and "loss.logit_scale" in out
    assert not any(k.startswith(("clip.", "audio_encoder.")) for k in out)
    with pytest.raises(KeyError, match="mystery"):
        convert_speechclip_state_dict({"parallel_branch.mystery": torch.zeros(1)})
