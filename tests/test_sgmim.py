"""SG-MIM (Woo et al., ICASSP 2024) on the model contract: presets, masks, the EMA teacher, the masked loss, the λ
schedule, retrieval embeddings equal to VG-HuBERT (M)'s, and 2 gloo processes against 1 process.

Everything runs on a tiny random HuBERT and a tiny random ViT-MAE saved locally (nothing is downloaded). Run as a
script (``python -m torch.distributed.run --nproc_per_node=2 tests/test_sgmim.py --towers DIR --out DIR``) this file
is also the worker of the multi-process test.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import HubertConfig, HubertModel, ViTMAEConfig, ViTMAEModel

from _tiny_speechclip import SPEECH
from vgskit.contract import Batch, ImageInputs, SpeechInputs, TrainState
from vgskit.losses import margin_infonce_loss
from vgskit.models import create_model, model_config
from vgskit.models.vg_hubert import SGMIM, SGMIMConfig, VGHuBERT, VGHuBERTConfig

#: A 3-layer tiny HuBERT (the tiny preset keeps 2 and re-initialises the last kept one), no dropout.
TINY_HUBERT = dict(SPEECH, num_hidden_layers=3)
#: A tiny ViT-MAE: 32x32 images in 8x8 patches (16 patches, 4 of them visible at a 75 % mask ratio), width 24.
TINY_MAE = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, image_size=32,
                patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
HERE = Path(__file__).resolve()


def save_tiny_towers(folder: Path) -> tuple[Path, Path]:
    """Save the tiny HuBERT and ViT-MAE into ``folder`` (own seeded RNG; the global one is left alone)."""
    hubert, mae = folder / "hubert", folder / "mae"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        HubertModel(HubertConfig(**TINY_HUBERT)).eval().save_pretrained(hubert)
        ViTMAEModel(ViTMAEConfig(**TINY_MAE)).eval().save_pretrained(mae)
    return hubert, mae


def tiny_sgmim(towers: tuple[Path, Path], seed: int = 0, **overrides: Any) -> SGMIM:
    torch.manual_seed(seed)
    model = create_model("sg_mim_tiny", speech={"name_or_path": str(towers[0])},
                         image={"name_or_path": str(towers[1])}, **overrides)
    assert isinstance(model, SGMIM)
    return model


def random_batch(seed: int = 0) -> Batch:
    """Six captions of four images (two images with two captions each), 0.1-0.3 s of noise, 32x32 images."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([4800, 3200, 1600, 4000, 2400, 3600])
    wavs = torch.randn(6, int(lengths.max()), generator=g) * 0.1
    wavs = wavs * (torch.arange(wavs.shape[1]) < lengths[:, None])
    image_ids = torch.tensor([0, 0, 1, 2, 3, 3])
    pixels = torch.randn(4, 3, 32, 32, generator=g)[image_ids]
    return Batch(SpeechInputs.waveform(wavs, lengths), ImageInputs.from_pixels(pixels), image_ids,
                 torch.tensor([10, 11, 12, 13, 14, 15]))


def hand_momentum(base: float, step: int, total: int) -> float:
    """Cosine from ``base`` (step 0) to 1 (last step), written out."""
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * step / total))


# ----------------------------------------------------------------------------------------- a training corpus


class RandomPairs(Dataset):
    """``2 * n_images`` captions (two per image) of 0.1-0.2 s random noise, and random 32x32 images."""

    def __init__(self, n_images: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n_images, 3, 32, 32, generator=g)
        self.lengths = torch.randint(1600, 3200, (2 * n_images,), generator=g)
        self.wavs = [torch.randn(int(n), generator=g) * 0.1 for n in self.lengths]

    def __len__(self) -> int:
        return len(self.wavs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"wav": self.wavs[i], "pixels": self.images[i // 2], "image_id": i // 2, "caption_id": i}


def collate_pairs(items: list[dict[str, Any]]) -> Batch:
    lengths = torch.tensor([len(it["wav"]) for it in items])
    wavs = torch.zeros(len(items), int(lengths.max()))
    for row, it in enumerate(items):
        wavs[row, : len(it["wav"])] = it["wav"]
    return Batch(SpeechInputs.waveform(wavs, lengths), ImageInputs.from_pixels(torch.stack([it["pixels"] for it in items])),
                 torch.tensor([it["image_id"] for it in items]), torch.tensor([it["caption_id"] for it in items]))


def train_tiny(towers: tuple[Path, Path], out: Path, resume: bool = False, **train: Any) -> SGMIM:
    """Two epochs of 4 steps (batch 4 of 16 captions); λ = 0 in epoch 0 (decoder unused), 2.0 in epoch 1."""
    from vgskit.train.config import TrainConfig
    from vgskit.train.loop import Trainer

    # A low starting momentum, so that in 8 steps the teacher moves far enough for the comparison to mean something.
    model = tiny_sgmim(towers, mim_start_epoch=1, momentum=0.5)
    # BertAdam with weight decay: a parameter given a zero gradient (instead of none) while λ = 0 would still move,
    # so the comparison below also checks that the unused decoder is left alone by every process. A large ε bounds
    # how much float rounding in the gradients (summed in another order across processes) can move a step.
    cfg = TrainConfig(**{"optimizer": "bertadam", "schedule": "bert_warmup_linear", "warmup_fraction": 0.25,
                         "lr": 1e-3, "eps": 1e-3, "weight_decay": 0.01, "epochs": 2, "batch_size": 4,
                         "grad_clip": 1.0, "log_every": 1, "ckpt_every": None, "eval_every": None,
                         "tensorboard": False, "out_dir": str(out), **train})
    # Keep a copy of the decoder as it stands after the last update of epoch 0 (step 4), where λ was 0 throughout.
    model.decoder_after_epoch0 = {}  # type: ignore[attr-defined]
    update = model.after_step

    def recording_after_step(state: TrainState) -> None:
        update(state)
        if state.step == 4:
            model.decoder_after_epoch0.update(  # type: ignore[attr-defined]
                {k: v.detach().clone() for k, v in model.decoder.state_dict().items()})

    model.after_step = recording_after_step  # type: ignore[method-assign]
    Trainer(model, cfg, RandomPairs(), collate_pairs, model_name="sg_mim_tiny", model_config=model.config,
            progress_bar=False).fit(resume=resume)
    return model


def _worker() -> None:
    from safetensors.torch import save_file

    from vgskit.train import distributed as D

    parser = argparse.ArgumentParser()
    parser.add_argument("--towers", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.towers)
    model = train_tiny((folder / "hubert", folder / "mae"), Path(args.out) / "run")
    if D.is_main():
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(args.out) / "weights.safetensors"))
        save_file(model.decoder_after_epoch0, str(Path(args.out) / "decoder_epoch0.safetensors"))
    D.barrier()
    D.cleanup()


if __name__ == "__main__":
    _worker()
    sys.exit(0)

import pytest  # noqa: E402  (the worker above runs without pytest)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One CPU thread: the tensors are tiny and extra threads only add contention; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return save_tiny_towers(tmp_path_factory.mktemp("sgmim_towers"))


# ------------------------------------------------------------------------------------------------ presets


def test_preset_holds_the_paper_settings() -> None:
    cfg = model_config("sg_mim")
    assert isinstance(cfg, SGMIMConfig) and isinstance(cfg, VGHuBERTConfig)
    # §3.2: MAE ViT-B/16 (fine-tuned, mean of Z_I per §2.2); HuBERT Base, last 3 layers re-initialised; linear
    # projections to 768; 75 % masking; momentum 0.999 -> 1; λ = 2.0 after 3 epochs. Eq. 2: no margin.
    assert (cfg.image.name_or_path, cfg.image.pool, cfg.image.freeze) == ("mae-vit-b16", "mean", False)
    assert (cfg.speech.num_layers, cfg.speech.reinit_last, cfg.speech.freeze_cnn) == (12, 3, True)
    assert (cfg.embed_dim, cfg.projection, cfg.margin) == (768, "linear", 0.0)
    assert (cfg.mask_ratio, cfg.momentum, cfg.mim_weight, cfg.mim_start_epoch) == (0.75, 0.999, 2.0, 3)
    assert cfg.summary_layer is None  # the last speech layer
    # The VG-HuBERT (M) part is the vg_hubert_m preset apart from the margin.
    base = model_config("vg_hubert_m")
    for f in dataclasses.fields(VGHuBERTConfig):
        if f.name != "margin":
            assert getattr(cfg, f.name) == getattr(base, f.name), f.name


def test_config_errors_name_the_field(towers, tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTModel

    from vgskit.errors import ConfigError

    with pytest.raises(ConfigError, match="mask_ratio"):
        model_config("sg_mim", mask_ratio=1.0)
    with pytest.raises(ConfigError, match="decoder_dim"):
        model_config("sg_mim", decoder_dim=20, decoder_heads=3)
    with pytest.raises(ConfigError, match="mim_reduction"):
        model_config("sg_mim", mim_reduction="median")
    # A plain ViT cannot encode the visible patches only: SG-MIM asks for an MAE ViT by name.
    vit = tmp_path / "vit"
    ViTModel(ViTConfig(**TINY_MAE), add_pooling_layer=False).save_pretrained(vit)
    with pytest.raises(ConfigError, match="vit_mae"):
        create_model("sg_mim_tiny", speech={"name_or_path": str(towers[0])}, image={"name_or_path": str(vit)})


# ------------------------------------------------------------------------------------------------ masking


def test_a_quarter_of_the_patches_is_visible_and_masks_are_reproducible(towers) -> None:
    model = tiny_sgmim(towers)
    assert (model.num_patches, model.num_visible) == (16, 4)
    assert model.num_visible / model.num_patches == 0.25
    ids = torch.tensor([3, 7, 9])
    vis = model.draw_visible(ids, step=5)
    assert vis.shape == (3, 4) and all(len(set(r.tolist())) == 4 for r in vis)
    assert torch.equal(vis, model.draw_visible(ids, step=5))  # same step and captions: same masks
    # A caption's mask does not depend on its batch mates (what lets 2 processes draw what 1 process draws).
    assert torch.equal(model.draw_visible(torch.tensor([7]), step=5)[0], vis[1])
    assert not torch.equal(vis, model.draw_visible(ids, step=6))  # a new draw every step
    # Over many draws every patch is visible about a quarter of the time (random, not a fixed pattern).
    many = model.draw_visible(torch.arange(400), step=0)
    counts = torch.bincount(many.flatten(), minlength=16).float() / 400
    assert counts.min() > 0.15 and counts.max() < 0.35


def test_only_visible_patches_enter_the_masked_encoder(towers) -> None:
    model = tiny_sgmim(towers).eval()
    pixels = torch.randn(2, 3, 32, 32)
    vis = model.draw_visible(torch.tensor([0, 1]), step=0)
    with torch.no_grad():
        feats = model.encode_visible(pixels, vis)
        assert feats.shape == (2, 4, 24)
        # Changing every masked patch's pixels leaves the visible features unchanged.
        changed = pixels.clone()
        for row in range(2):
            for p in set(range(16)) - set(vis[row].tolist()):
                r, c = divmod(p, 4)
                changed[row, :, 8 * r: 8 * r + 8, 8 * c: 8 * c + 8] = torch.randn(3, 8, 8)
        assert torch.equal(model.encode_visible(changed, vis), feats)
        # ...while changing a visible patch changes them.
        r, c = divmod(int(vis[0, 0]), 4)
        changed[0, :, 8 * r: 8 * r + 8, 8 * c: 8 * c + 8] += 1.0
        assert not torch.allclose(model.encode_visible(changed, vis)[0], feats[0])
        # The full-image path used for retrieval is unaffected by the masked calls (MAE's ratio is restored).
        assert model.image_tower(pixels).tokens.shape == (2, 16, 24)


# ---------------------------------------------------------------------------------------- EMA teacher


def test_ema_update_is_exact_and_the_teacher_gets_no_gradient(towers) -> None:
    model = tiny_sgmim(towers)
    teacher = dict(model.teacher.named_parameters())
    assert teacher and not any(p.requires_grad for p in teacher.values())
    # Not in the optimizer: no group holds a teacher parameter.
    grouped = {id(p) for g in model.param_groups(0.01) for p in g["params"]}
    assert not grouped & {id(p) for p in teacher.values()}
    assert {id(p) for p in model.decoder.parameters()} <= grouped
    # Saved (a resumed run restores it), as parameters, not as a data-sized buffer.
    assert all(f"teacher.{n}" in model.state_dict() for n in teacher)

    # One step with λ > 0: gradients reach the student, the decoder and the speech tower, never the teacher.
    model.train()
    out = model(random_batch(), TrainState(step=0, epoch=3, total_steps=10))
    out.loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.decoder.mask_token.grad is not None and model.decoder.mask_token.grad.abs().sum() > 0
    assert model.image_tower.model.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0

    # Move the student, then update: teacher = α·teacher + (1-α)·student with α from the cosine schedule.
    with torch.no_grad():
        for p in model.image_tower.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    before = {n: p.detach().clone() for n, p in model.teacher.named_parameters()}
    student = dict(model.image_tower.named_parameters())
    step, total = 3, 10
    alpha = hand_momentum(0.999, step, total)
    assert alpha == pytest.approx(1 - 0.001 * 0.5 * (1 + math.cos(0.3 * math.pi)))
    model.after_step(TrainState(step=step, epoch=0, total_steps=total))
    for n, got in model.teacher.named_parameters():
        s = student[n].detach()
        if student[n].requires_grad:
            want = before[n].clone().mul_(alpha).add_(s, alpha=1.0 - alpha)
            assert torch.equal(got, want), n
            assert not torch.equal(got, before[n]), n
        else:  # MAE's fixed sine-cosine positions: copied
            assert torch.equal(got, s), n
    # The schedule ends at α = 1: the teacher no longer moves.
    frozen = {n: p.detach().clone() for n, p in model.teacher.named_parameters()}
    model.after_step(TrainState(step=total, epoch=0, total_steps=total))
    assert all(torch.equal(p, frozen[n]) for n, p in model.teacher.named_parameters())
    assert model.momentum_at(0.0) == pytest.approx(0.999) and model.momentum_at(1.0) == 1.0
    # The teacher stays in eval mode when the model trains.
    model.train()
    assert not model.teacher.training and model.image_tower.training


# ----------------------------------------------------------------------------------------------- losses


def test_mim_loss_counts_masked_positions_only(towers) -> None:
    model = tiny_sgmim(towers)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 16, 5, generator=g), torch.randn(2, 16, 5, generator=g)
    vis = torch.tensor([[0, 3, 8, 15], [1, 2, 4, 9]])
    loss = model.mim_loss(pred, target, vis)
    # Hand-written MSE over the masked positions (12 per row, 5 features each).
    total, count = 0.0, 0
    for b in range(2):
        for n in range(16):
            if n not in vis[b].tolist():
                total += float(((pred[b, n] - target[b, n]) ** 2).sum())
                count += 5
    assert loss.item() == pytest.approx(total / count, rel=1e-6)
    # Anything at the visible positions, in the prediction or the target, leaves the loss unchanged.
    p2, t2 = pred.clone(), target.clone()
    for b in range(2):
        p2[b, vis[b]] = 100.0
        t2[b, vis[b]] = -7.0
    assert torch.equal(model.mim_loss(p2, t2, vis), loss)
    # Eq. 4 as printed: squared L2 norm per patch, averaged over the masked patches.
    model.config = dataclasses.replace(model.config, mim_reduction="sum")
    assert model.mim_loss(pred, target, vis).item() == pytest.approx(total / 24, rel=1e-6)


def test_step_losses_follow_the_paper_and_lambda_follows_the_epoch(towers) -> None:
    model = tiny_sgmim(towers).eval()  # deterministic (the towers have no dropout either)
    batch = random_batch()
    with torch.no_grad():
        # Epochs 0, 1, 2 (0-based): the reconstruction loss is off, and not even computed.
        for epoch in (0, 2):
            out = model(batch, TrainState(step=4, epoch=epoch, total_steps=10))
            assert set(out.losses) == {"nce"} and out.metrics["mim_weight"] == 0.0
        assert out.metrics["momentum"] == pytest.approx(hand_momentum(0.999, 5, 10))
        out = model(batch, TrainState(step=4, epoch=3, total_steps=10))
        assert set(out.losses) == {"nce", "mim"} and out.metrics["mim_weight"] == 2.0

        # NCE (Eq. 2): raw dot products of the retrieval embeddings of the FULL image and the speech, no margin.
        speech = model.encode_speech(batch.speech.values, batch.speech.lengths)
        image = model.encode_image(batch.image.pixels)
        want = margin_infonce_loss(speech @ image.T, batch.image_ids, margin=0.0)
        assert out.losses["nce"].item() == pytest.approx(want.item(), rel=1e-5)

        # MIM, recomputed from the parts: the speech summary W·Z_A of the last layer, visible features, teacher.
        vis = model.draw_visible(batch.caption_ids, 4)
        attn = model.cls_attention(batch.speech.values, batch.speech.lengths, layer=model.num_layers - 1)
        summary = torch.stack([attn.weights[b] @ attn.features[b] for b in range(len(batch))])  # [B, H, D]
        assert summary.shape == (6, 2, 32)
        pred = model.decoder(model.encode_visible(batch.image.pixels, vis), vis, summary)
        target = model.teacher(batch.image.pixels).tokens
        masked = [(b, n) for b in range(6) for n in range(16) if n not in vis[b].tolist()]
        mse = torch.stack([((pred[b, n] - target[b, n]) ** 2).mean() for b, n in masked]).mean()
        assert out.losses["mim"].item() == pytest.approx(2.0 * mse.item(), rel=1e-4)

        # The speech guides the reconstruction: another caption's summary changes the loss.
        other = model.decoder(model.encode_visible(batch.image.pixels, vis), vis, summary.flip(0))
        assert not torch.allclose(other, pred)


def test_retrieval_embeddings_are_vg_hubert_m_path(towers) -> None:
    model = tiny_sgmim(towers).eval()
    base_cfg = VGHuBERTConfig(**{f.name: getattr(model.config, f.name) for f in dataclasses.fields(VGHuBERTConfig)})
    plain = VGHuBERT(base_cfg).eval()
    extra = [k for k in model.state_dict() if k.split(".")[0] in ("teacher", "decoder")]
    assert extra  # the MIM parts exist in training...
    state = {k: v for k, v in model.state_dict().items() if k not in extra}
    plain.load_state_dict(state, strict=True)  # ...and everything else is exactly VG-HuBERT (M)
    batch = random_batch(1)
    with torch.no_grad():
        s = model.embed_speech(batch.speech).pooled
        i = model.embed_image(batch.image).pooled
        assert torch.equal(s, plain.encode_speech(batch.speech.values, batch.speech.lengths))
        assert torch.equal(i, plain.encode_image(batch.image.pixels))
        # No masking at retrieval: after training steps with masks drawn, the embeddings are unchanged.
        model(batch, TrainState(step=7, epoch=5, total_steps=10))
        assert torch.equal(model.embed_image(batch.image).pooled, i)


def test_loss_goes_down_with_both_losses_on(towers) -> None:
    model = tiny_sgmim(towers).train()
    batch = random_batch()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(8):
        state = TrainState(step=step, epoch=3, total_steps=8)
        out = model(batch, state)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.after_step(TrainState(step=step + 1, epoch=3, total_steps=8))
        losses.append((out.losses["nce"].item(), out.losses["mim"].item()))
    assert losses[-1][0] < losses[0][0] and losses[-1][1] < losses[0][1], losses


# -------------------------------------------------------------------------------------- data parallelism


def test_two_gloo_processes_train_what_one_process_trains(towers, tmp_path: Path) -> None:
    """torchrun with 2 gloo processes against this process: an epoch with λ = 0 (decoder unused, DDP told so)
    and one with λ = 2, BertAdam with weight decay, the EMA teacher after every step."""
    folder = towers[0].parent
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(HERE),
           "--towers", str(folder), "--out", str(tmp_path / "two")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    single = train_tiny(towers, tmp_path / "one")  # meanwhile, the same run in this process
    try:
        stdout, stderr = proc.communicate(timeout=170)
    except subprocess.TimeoutExpired:
        proc.kill()  # the launcher; its workers end with it
        stdout, stderr = proc.communicate()
        pytest.fail("the 2-process run did not finish in 170 s:\n" + stdout[-2000:] + stderr[-2000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]

    from safetensors.torch import load_file

    two = load_file(str(tmp_path / "two" / "weights.safetensors"))
    one = {k: v.detach() for k, v in single.state_dict().items()}
    assert one.keys() == two.keys()
    init = tiny_sgmim(towers, mim_start_epoch=1, momentum=0.5).state_dict()
    moved = {k: float((one[k] - init[k]).abs().max()) for k in one}
    # Training moved the speech and image towers, the decoder (epoch 1) and the teacher (every step).
    for prefix in ("speech_tower.", "image_tower.", "decoder.", "teacher.", "audio_proj."):
        assert max(v for k, v in moved.items() if k.startswith(prefix)) > 1e-4, prefix
    # While λ = 0 the decoder was left exactly as built by both runs (no gradient, so no Adam or weight-decay
    # update): DDP with find_unused_parameters leaves a parameter no process used without a gradient.
    decoder0 = {k[len("decoder."):]: v for k, v in init.items() if k.startswith("decoder.")}
    two_decoder0 = load_file(str(tmp_path / "two" / "decoder_epoch0.safetensors"))
    for k, v in decoder0.items():
        assert torch.equal(single.decoder_after_epoch0[k], v) and torch.equal(two_decoder0[k], v), k
    # The weights agree to float rounding (gradients summed in another order across processes; the large ε keeps
    # BertAdam from amplifying it): far below the ~1e-5 a weight-decay step on an unused decoder would leave.
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < 1e-6, f"2-process weights differ from 1-process weights by up to {worst}"


def test_resume_is_exact_across_the_start_of_the_reconstruction_loss(towers, tmp_path: Path) -> None:
    """Stopped after step 5 (the first step with λ = 2) and resumed: the teacher, the decoder and every weight end
    exactly as in an uninterrupted run (the teacher is in the checkpoint; masks depend on the step, not the run)."""
    straight = train_tiny(towers, tmp_path / "a", ckpt_every=1)
    train_tiny(towers, tmp_path / "b", ckpt_every=1, stop_after_steps=5)
    resumed = train_tiny(towers, tmp_path / "b", resume=True, ckpt_every=1)
    # The second call resumed (steps 6-8 logged once, after the first call's 1-5), and through the trainer λ is 0
    # in epoch 0 (steps 1-4) and 2.0 from epoch 1 on (the run's mim_start_epoch).
    import json

    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["mim_weight"] for r in train] == [0.0] * 4 + [2.0] * 4
    assert [("loss/mim" in r) for r in train] == [False] * 4 + [True] * 4
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("teacher.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
