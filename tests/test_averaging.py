"""train.ema: the bias-corrected weight average (hand-computed), its checkpoint state, and a run that stops and resumes
ending with the average of all its steps (the state restored from the checkpoint, checked by the formula)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_policy
from safetensors.torch import load_file
from test_cli import cli

from iqstar_lite.algorithm.averaging import WeightAverage
from iqstar_lite.checkpoint import load_average


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


def test_averaged_run_saves_the_average_and_a_resumed_run_keeps_averaging(tmp_path, tiny_path):
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

    # Stop after step 2, resume to 4: the resumed run restores the average's state (m_2, 2 steps) and ends with
    # (d^2 m_2 + d (1 - d) w_3 + (1 - d) w_4) / (1 - d^4). Checked against that formula on this run's own w_3, w_4 (its
    # last two checkpoints) rather than against the uninterrupted run, so the check does not rest on two processes
    # following bit-identical trajectories (tests/test_faults.py checks that for the raw weights).
    split = tmp_path / "split"
    res = cli(*args, "train.steps=2", f"out_dir={split}")
    assert res.returncode == 0, res.stderr[-3000:]
    m2 = load_average(split / "checkpoints" / "step-000002")
    assert m2["steps"] == 2
    res = cli(*args, "train.steps=4", "train.resume=true", f"out_dir={split}")
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = _adapter(split / "adapter")
    w3s = _adapter(split / "checkpoints" / "step-000003" / "adapter")
    w4s = _adapter(split / "checkpoints" / "step-000004" / "adapter")
    assert resumed.keys() == averaged.keys()
    order = [  # the moments are in the order of the trainable parameters; the adapter file names them without ".default"
        n.replace(".default", "")
        for n, p in make_policy(tiny_path, randomize_lora=False).named_parameters()
        if p.requires_grad
    ]
    assert sorted(order) == sorted(resumed) and len(m2["moments"]) == len(order)
    d = 0.5
    for name, m in zip(order, m2["moments"]):
        expected = (d * d * m + d * (1 - d) * w3s[name].float() + (1 - d) * w4s[name].float()) / (1 - d**4)
        torch.testing.assert_close(resumed[name].float(), expected, rtol=1e-5, atol=1e-7, msg=name)
        if "lora_B" in name:  # an average restarted at step 3 ((w3 + 2 w4) / 3) would be far from it
            assert not torch.allclose((w3s[name] + 2 * w4s[name]) / 3, expected, rtol=1e-3, atol=1e-6), name


def test_ema_out_of_range_is_one_line(tmp_path):
    res = cli("tiny_cpu", "train.ema=1.0", f"out_dir={tmp_path / 'r'}")
    assert res.returncode == 2 and "train.ema" in res.stderr and "Traceback" not in res.stderr
