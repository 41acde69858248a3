"""Tiny contrastive dual encoder + data used by the training-engine tests, runnable under torchrun.

Two small MLP towers embed an "audio" vector and an "image" vector; the loss is symmetric InfoNCE over the
GLOBAL batch (features gathered with ``all_gather_with_grad``), with same-image negatives masked. Each image
has two captions and the batch factory keeps both in the same batch, so the mask matters.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_ddp_worker.py --out /tmp/ddp

writes ``weights.safetensors`` and ``grads.safetensors`` (main rank: final weights, gradients on the first
global batch) and ``seen_rank<R>.json`` (dataset indices each rank loaded, fit summary).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from vgskit.contract import StepOutput, TrainState
from vgskit.train import distributed as D
from vgskit.train.config import TrainConfig
from vgskit.train.loop import Trainer

AUDIO_DIM, IMAGE_DIM = 6, 5


class PairData(Dataset):
    """``n_images * 2`` captions; caption ``i`` belongs to image ``i // 2``."""

    def __init__(self, n_images: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n_images, IMAGE_DIM, generator=g)
        mix = torch.randn(IMAGE_DIM, AUDIO_DIM, generator=g)
        self.audio = (self.images.repeat_interleave(2, dim=0) @ mix
                      + 0.3 * torch.randn(2 * n_images, AUDIO_DIM, generator=g))

    def __len__(self) -> int:
        return self.audio.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i, "audio": self.audio[i], "image": self.images[i // 2], "image_id": i // 2}


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "index": torch.tensor([it["index"] for it in items]),
        "audio": torch.stack([it["audio"] for it in items]),
        "image": torch.stack([it["image"] for it in items]),
        "image_id": torch.tensor([it["image_id"] for it in items]),
    }


def pair_batches(batch_size: int, n_images: int):
    """Batch factory: shuffled images, both captions of an image adjacent in the same global batch."""

    def factory(epoch: int, seed: int) -> list[list[int]]:
        order = np.random.default_rng([seed, epoch, 7]).permutation(n_images).tolist()
        flat = [c for img in order for c in (2 * img, 2 * img + 1)]
        return [flat[i:i + batch_size] for i in range(0, len(flat) - batch_size + 1, batch_size)]

    return factory


def tower(d_in: int, dropout: float, batchnorm: bool = False) -> nn.Module:
    # LayerNorm by default: BatchNorm statistics differ between a rank's half batch and the full one unless the
    # trainer freezes them (train.batchnorm: frozen), which the BatchNorm variant checks.
    norm = [nn.BatchNorm1d(16)] if batchnorm else []
    return nn.Sequential(nn.Linear(d_in, 16), *norm, nn.GELU(), nn.Dropout(dropout), nn.LayerNorm(16),
                         nn.Linear(16, 8))


class ToyDualEncoder(nn.Module):
    def __init__(self, dropout: float = 0.0, batchnorm: bool = False):
        super().__init__()
        self.audio_tower = tower(AUDIO_DIM, dropout, batchnorm)
        self.image_tower = tower(IMAGE_DIM, dropout, batchnorm)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, batch: dict[str, torch.Tensor], state: TrainState | None = None) -> StepOutput:
        a = F.normalize(self.audio_tower(batch["audio"]), dim=-1)
        v = F.normalize(self.image_tower(batch["image"]), dim=-1)
        a_all, v_all = D.all_gather_with_grad(a), D.all_gather_with_grad(v)
        ids = D.all_gather_no_grad(batch["image_id"])
        logits = self.logit_scale.exp() * a_all @ v_all.T
        same = ids[:, None] == ids[None, :]
        eye = torch.eye(len(ids), dtype=torch.bool, device=ids.device)
        # Another caption of the same image is not a negative.
        logits = logits.masked_fill(same & ~eye, float("-inf"))
        target = torch.arange(len(ids), device=ids.device)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        return StepOutput(losses={"infonce": loss}, metrics={"scale": self.logit_scale.detach().exp()})


def make_config(out_dir: str | Path, **overrides: Any) -> TrainConfig:
    base: dict[str, Any] = dict(optimizer="adam", lr=1e-2, weight_decay=0.01, warmup_steps=2, max_steps=5,
                                batch_size=8, grad_clip=0.05, seed=3, log_every=1, ckpt_every=None,
                                eval_every=None, keep_last=2, out_dir=str(out_dir), tensorboard=False)
    base.update(overrides)
    return TrainConfig(**base)


def run(out_dir: str | Path, batchnorm: bool = False, **overrides: Any
        ) -> tuple[ToyDualEncoder, dict[str, Any], list[list[int]]]:
    """Train the toy model; return it, the fit summary and the dataset indices this rank loaded per step."""
    mode = overrides.pop("batchnorm_mode", "batch")
    cfg = make_config(out_dir, **{"eval_every": 2, "select_metric": "probe_loss", "select_mode": "min",
                                  "batchnorm": mode, **overrides})
    torch.manual_seed(0)
    model = ToyDualEncoder(batchnorm=batchnorm)
    data = PairData()
    seen: list[list[int]] = []

    def recording_collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seen.append([it["index"] for it in items])
        return collate(items)

    probe = collate([data[i] for i in range(8)])

    def evaluate(m: nn.Module) -> dict[str, float]:
        # Calls the full forward, whose gathers must act locally while only the main rank evaluates.
        return {"probe_loss": m(probe).loss.item()}

    trainer = Trainer(model, cfg, data, recording_collate, evaluate_fn=evaluate,
                      batch_sampler_factory=pair_batches(cfg.batch_size, len(data.images)))
    summary = trainer.fit()
    return model, summary, seen


def first_batch_grads(seed: int = 3, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Parameter gradients of the loss on the first global batch, through DDP when running distributed.

    Adam and clipping hide a constant gradient scale, so this checks the gradient itself: with the
    gather's summed backward and DDP's averaging it must equal the single-process gradient.
    """
    D.init_distributed()
    torch.manual_seed(0)
    model = ToyDualEncoder()
    data = PairData()
    global_batch = pair_batches(batch_size, len(data.images))(0, seed)[0]
    local = D.split_global_batch(global_batch, D.get_rank(), D.get_world_size())
    wrapped = nn.parallel.DistributedDataParallel(model) if D.is_dist() else model
    wrapped(collate([data[i] for i in local]), TrainState()).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batchnorm", default=None, choices=["batch", "frozen"],
                        help="train the BatchNorm variant with this train.batchnorm mode (weights only)")
    args = parser.parse_args()
    out = Path(args.out)
    if args.batchnorm is not None:
        model, _, _ = run(out / "run", batchnorm=True, batchnorm_mode=args.batchnorm)
        if D.is_main():
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "weights.safetensors"))
        D.barrier()
        D.cleanup()
        return
    grads = first_batch_grads()
    model, summary, seen = run(out / "run")
    rank = D.get_rank()
    (out / f"seen_rank{rank}.json").write_text(json.dumps({"seen": seen, "summary": summary}))
    if D.is_main():
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "weights.safetensors"))
        save_file(grads, str(out / "grads.safetensors"))
    D.barrier()
    D.cleanup()


if __name__ == "__main__":
    main()
