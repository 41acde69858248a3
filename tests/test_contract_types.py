"""The typed values of :mod:`vgskit.contract`: validation, row selection, concatenation, device moves."""

from __future__ import annotations

import pytest
import torch

from vgskit.contract import Batch, Embeddings, ImageInputs, SpeechInputs, StepOutput, TrainState
from vgskit.errors import ConfigError


def test_speech_inputs_name_their_unit_and_check_shapes() -> None:
    wav = SpeechInputs.waveform(torch.zeros(2, 100), torch.tensor([100, 60]))
    assert wav.unit == "samples" and len(wav) == 2
    states = SpeechInputs("tower_states", torch.zeros(2, 3, 7, 4), torch.tensor([7, 5]), rate=50.0)
    assert states.unit == "frames"
    with pytest.raises(ConfigError, match="waveform"):
        SpeechInputs.waveform(torch.zeros(2, 3, 4), torch.tensor([1, 2]))  # features passed as waveforms
    with pytest.raises(ConfigError, match="lengths"):
        SpeechInputs.waveform(torch.zeros(2, 100), torch.tensor([100]))
    picked = states.select([1])
    assert picked.lengths.tolist() == [5] and picked.values.shape == (1, 3, 7, 4)


def test_image_inputs_require_the_fields_of_their_kind() -> None:
    with pytest.raises(ConfigError, match="boxes"):
        ImageInputs("regions", regions=torch.zeros(1, 2, 3), region_mask=torch.ones(1, 2, dtype=torch.bool))
    a = ImageInputs("regions", regions=torch.arange(6.0).view(1, 2, 3), boxes=torch.zeros(1, 2, 4),
                    region_mask=torch.tensor([[True, False]]))
    b = ImageInputs("regions", regions=torch.ones(1, 2, 3), boxes=torch.ones(1, 2, 4),
                    region_mask=torch.tensor([[True, True]]))
    both = ImageInputs.cat([a, b])
    assert len(both) == 2 and torch.equal(both.select([1, 0]).regions[1], a.regions[0])
    with pytest.raises(ConfigError, match="different kinds"):
        ImageInputs.cat([a, ImageInputs.from_pixels(torch.zeros(1, 3, 4, 4))])


def test_embeddings_select_and_cat_keep_rows_with_their_tokens() -> None:
    a = Embeddings(torch.tensor([[1.0, 0.0]]), torch.ones(1, 2, 3), torch.tensor([[True, True]]))
    b = Embeddings(torch.tensor([[0.0, 1.0]]), 2 * torch.ones(1, 4, 3), torch.tensor([[True, False, True, False]]))
    both = Embeddings.cat([a, b])
    assert both.tokens.shape == (2, 4, 3)
    assert both.mask.tolist() == [[True, True, False, False], [True, False, True, False]]
    assert torch.equal(both.tokens[0, 2:], torch.zeros(2, 3))  # padding added by cat
    # A selection trims the columns that are padding in every chosen row, but never a valid token.
    first = both.select([0])
    assert first.tokens.shape == (1, 2, 3) and torch.equal(first.pooled, a.pooled)
    second = both.select([1, 1])
    assert second.tokens.shape == (2, 3, 3) and second.mask[0].tolist() == [True, False, True]
    with pytest.raises(ConfigError, match="some parts have tokens"):
        Embeddings.cat([a, Embeddings(torch.zeros(1, 2))])
    with pytest.raises(ConfigError, match="mask"):
        Embeddings(torch.zeros(1, 2), torch.zeros(1, 3, 2), torch.ones(1, 2, dtype=torch.bool))


def test_step_output_sums_named_losses_and_rejects_non_scalars() -> None:
    out = StepOutput(losses={"coarse": torch.tensor(0.5), "fine": torch.tensor([2.0])})
    assert out.loss.item() == 2.5 and out.loss.dim() == 0
    with pytest.raises(ConfigError, match="at least one"):
        StepOutput(losses={})
    with pytest.raises(ConfigError, match="scalar"):
        StepOutput(losses={"x": torch.ones(2)})


def test_train_state_fraction_and_batch_moves() -> None:
    assert TrainState(step=5, total_steps=20).fraction == 0.25
    assert TrainState(step=30, total_steps=20).fraction == 1.0
    batch = Batch(SpeechInputs.waveform(torch.zeros(2, 10), torch.tensor([10, 4])),
                  ImageInputs.from_pixels(torch.zeros(2, 3, 4, 4)), torch.tensor([0, 0]), torch.tensor([3, 4]),
                  extras={"words": [["a"], None]})
    moved = batch.to_device("cpu")
    assert moved is not batch and moved.extras == batch.extras and len(moved) == 2
    assert torch.equal(moved.speech.lengths, batch.speech.lengths)
