"""train.ema: the bias-corrected weight average (hand-computed), its checkpoint state, and a run that stops and resumes
ending with the same averaged adapter as one that does not."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_cli import cli

from iqstar_lite.algorithm.averaging import WeightAverage


def test_average_is_the_bias_corrected_ema_by_hand():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    avg = WeightAverage([w], decay=0.5)
    assert torch.equal(avg.averaged()[0], w.detach())  # before any step: the weights themselves
    avg.update()  # m1 = 0.5 * w1 -> average w1
    assert torch.allclose(avg.averaged()[0], torch.tensor([1.0, -2.0]))
    with torch.no_grad():
        w.copy_(torch.tensor([3.0, 4.0]))
    avg.update()  # m2 = 0.25 w1 + 0.5 w2, / (1 - 0.25): (w1 + 2 w2) / 3
    assert torch.allclose(avg.averaged()[0], torch.tensor([7.0 / 3.0, 6.0 / 3.0]))
    state = avg.state_dict()
    avg.copy_to_params()
    assert torch.allclose(w.detach(), torch.tensor([7.0 / 3.0, 2.0]))

    other = WeightAverage([torch.nn.Parameter(torch.zeros(2))], decay=0.5)
    other.load_state_dict(state)
    assert other.steps == 2 and torch.allclose(other.averaged()[0], torch.tensor([7.0 / 3.0, 2.0]))
    with pytest.raises(ValueError, match="does not fit"):
        WeightAverage([torch.nn.Parameter(torch.zeros(3))], decay=0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage([w], decay=1.0)


def _adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def test_averaged_run_saves_the_average_and_resumes_to_the_same_adapter(tmp_path, tiny_path):
    args = ["tiny_cpu", "stages=train", "eval.enabled=false", "train.ema=0.5", "train.checkpoint_every=1"]
    full = tmp_path / "full"
    res = cli(*args, "train.steps=4", f"out_dir={full}")
    assert res.returncode == 0, res.stderr[-3000:]
    averaged, last_raw = _adapter(full / "adapter"), _adapter(full / "checkpoints" / "step-000004" / "adapter")
    lora_b = [k for k in averaged if "lora_B" in k]
    assert lora_b and any(
        not torch.equal(averaged[k], last_raw[k]) for k in lora_b
    )  # the average, not step 4's weights
    # the average of steps 3 and 4 alone would be (w3 + 2 w4) / 3 with decay 0.5; the real one also holds w1, w2
    w3 = _adapter(full / "checkpoints" / "step-000003" / "adapter")
    k = lora_b[0]
    assert not torch.allclose(averaged[k], (w3[k] + 2 * last_raw[k]) / 3)

    split = tmp_path / "split"
    res = cli(*args, "train.steps=2", f"out_dir={split}")
    assert res.returncode == 0, res.stderr[-3000:]
    res = cli(*args, "train.steps=4", "train.resume=true", f"out_dir={split}")
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = _adapter(split / "adapter")
    assert resumed.keys() == averaged.keys() and all(torch.equal(resumed[k], averaged[k]) for k in averaged)


def test_ema_out_of_range_is_one_line(tmp_path):
    res = cli("tiny_cpu", "train.ema=1.0", f"out_dir={tmp_path / 'r'}")
    assert res.returncode == 2 and "train.ema" in res.stderr and "Traceback" not in res.stderr
