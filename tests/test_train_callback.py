"""train(on_step=...): called with each step's metrics after its line is written; True stops early, adapter still saved."""

import json

import pytest
import torch
from conftest import make_policy

from iqstar_lite.algorithm.train import train
from iqstar_lite.config import load_recipe
from iqstar_lite.data.sources import load_prompts

pytestmark = pytest.mark.filterwarnings("ignore")


def test_on_step_sees_metrics_and_stops_early(tiny_path, tokenizer, tmp_path):
    cfg = load_recipe(
        "tiny_cpu",
        [
            f"model.path={tiny_path}",
            "train.steps=3",
            "rollout.prompts_per_step=2",
            "rollout.max_new_tokens=4",
            "train.checkpoint_every=0",
        ],
    )
    model = make_policy(tiny_path, randomize_lora=False)
    seen = []

    def on_step(m: dict):
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        seen.append((m["step"], len(lines), json.loads(lines[-1]) == m, m["seconds"] > 0))
        return True if m["step"] == 2 else None  # None (step 1) must not stop

    last = train(
        cfg, tmp_path, model, tokenizer, load_prompts(cfg.data).train[:2], torch.device("cpu"), on_step=on_step
    )
    assert seen == [(1, 1, True, True), (2, 2, True, True)]
    assert last["step"] == 2
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_update_refuses_non_finite_rewards_before_any_gradient(tiny_path, tokenizer):
    """A -inf reward (pi* = 0 for a sampled token) would make every LoRA gradient nan: the update stops first."""
    from accelerate import Accelerator

    from iqstar_lite.algorithm.train import make_optimizer, make_scheduler
    from iqstar_lite.algorithm.update import update

    cfg = load_recipe("tiny_cpu", [f"model.path={tiny_path}"])
    model = make_policy(tiny_path, randomize_lora=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, _ = make_optimizer(params, cfg)
    resp = torch.tensor([[5, 6, 7], [8, 9, 10]])
    mask = torch.ones(2, 3)
    rewards = torch.zeros(2, 3)
    rewards[1, 2] = float("-inf")
    est = {"rewards": rewards, "logp_ref": torch.zeros(2, 3)}
    with pytest.raises(RuntimeError, match="non-finite token rewards"):
        update(
            model,
            cfg,
            [[1, 2], [3]],
            resp,
            mask,
            est,
            0,
            params,
            optimizer,
            make_scheduler(optimizer, cfg),
            Accelerator(cpu=True),
        )
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("kl_in_advantage", [True, False])
def test_kl_in_advantage_has_no_gradient_when_the_policy_already_samples_pi_star(tiny_path, tokenizer, kl_in_advantage):
    """r = beta (log pi* - log pi_ref) and log pi_old = log pi* on every sampled token: A = beta (log pi* - log pi_old) = 0,
    so loss.kl_in_advantage moves nothing; the default (whitened r + beta k3 in the loss) still does."""
    from accelerate import Accelerator

    from iqstar_lite.algorithm.train import make_optimizer, make_scheduler
    from iqstar_lite.algorithm.update import update

    cfg = load_recipe(
        "tiny_cpu", [f"model.path={tiny_path}", "loss.type=pg", f"loss.kl_in_advantage={str(kl_in_advantage).lower()}"]
    )
    model = make_policy(tiny_path)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, _ = make_optimizer(params, cfg)
    g = torch.Generator().manual_seed(0)
    resp, mask = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.ones(2, 3)
    lp_star, lp_ref = -torch.rand(2, 3, generator=g) * 3, -torch.rand(2, 3, generator=g) * 3
    est = {"rewards": cfg.loss.beta * (lp_star - lp_ref), "logp_ref": lp_ref}
    before = [p.detach().clone() for p in params]
    update(
        model,
        cfg,
        [[1, 2], [3]],
        resp,
        mask,
        est,
        0,
        params,
        optimizer,
        make_scheduler(optimizer, cfg),
        Accelerator(cpu=True),
        logp_sampled=lp_star,
    )
    moved = any(not torch.equal(b, p.detach()) for b, p in zip(before, params))
    assert moved is not kl_in_advantage


def test_guided_rows_move_nothing_when_the_policy_already_is_pi_star(tiny_path, tokenizer):
    """Guided rows (pi-hat*'s own samples) train with KL(pi* || pi_theta) over the vocabulary: with pi* set to the
    policy's own distribution there, and on-policy advantages 0 (log pi_old = log pi*), the LoRA gradient is 0 (to float
    rounding: p - q); a target that differs from the policy on the guided rows gives a gradient and moves the weights."""
    from accelerate import Accelerator

    from iqstar_lite.algorithm.rollout import pack, response_logits
    from iqstar_lite.algorithm.train import make_optimizer, make_scheduler
    from iqstar_lite.algorithm.update import Guided, update

    cfg = load_recipe("tiny_cpu", [f"model.path={tiny_path}", "loss.type=pg"])
    model = make_policy(tiny_path)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    resp, mask = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.ones(2, 3)
    lp_star, lp_ref = -torch.rand(2, 3, generator=g) * 3, -torch.rand(2, 3, generator=g) * 3
    est = {"rewards": cfg.loss.beta * (lp_star - lp_ref), "logp_ref": lp_ref}
    g_ids, g_resp, g_mask = [[1, 2], [3]], torch.tensor([[11, 12], [13, 2]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    model.train()
    with torch.no_grad():
        own = torch.log_softmax(response_logits(model, pack(g_ids, g_resp, 0), 2).float(), -1)

    def run(target):
        optimizer, _ = make_optimizer(params, cfg)
        before = [p.detach().clone() for p in params]
        guided = Guided(g_ids, g_resp, g_mask, {"logp_star_full": target, "logp_ref": torch.zeros(2, 2)})
        sums = update(
            model,
            cfg,
            [[1, 2], [3]],
            resp,
            mask,
            est,
            0,
            params,
            optimizer,
            make_scheduler(optimizer, cfg),
            Accelerator(cpu=True),
            logp_sampled=lp_star,
            guided=guided,
        )
        moved = any(not torch.equal(b, p.detach()) for b, p in zip(before, params))
        for b, p in zip(before, params):
            p.data.copy_(b)
        return moved, sums

    _, sums = run(own)
    assert sums["grad_norm"] < 1e-5 and abs(sums["kl_star_guided"]) < 1e-5
    moved, sums = run(torch.log_softmax(own + torch.randn(own.shape, generator=g), -1))
    assert moved and sums["grad_norm"] > 1e-3 and sums["kl_star_guided"] > 1e-3


def test_position_halflife_weighs_every_loss_by_position(tiny_path, tokenizer, monkeypatch):
    """loss.position_halflife=1 on 3-token rows: the loss gets the weights 1 / (1 + t) = [1, 1/2, 1/3] instead of the mask,
    and the step's loss is their weighted mean (token-weighted accumulation over micro-batches included)."""
    from accelerate import Accelerator

    import iqstar_lite.algorithm.train as loop
    import iqstar_lite.algorithm.update as step
    from iqstar_lite.algorithm.loss import imitation_loss

    seen, reported = [], []

    def spy(logp, logp_ref, rewards, mask, beta):
        seen.append(mask.detach().clone())
        loss, met = imitation_loss(logp, logp_ref, rewards, mask, beta)
        reported.append((loss.item(), float(mask.sum())))
        return loss, met

    monkeypatch.setattr(step, "imitation_loss", spy)
    for halflife, want in ((0, [1.0, 1.0, 1.0]), (1, [1.0, 0.5, 1 / 3])):
        seen.clear()
        reported.clear()
        cfg = load_recipe(
            "tiny_cpu",
            [
                f"model.path={tiny_path}",
                "loss.type=imitation",
                f"loss.position_halflife={halflife}",
                "train.micro_batch=1",
            ],
        )
        model = make_policy(tiny_path, randomize_lora=False)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, _ = loop.make_optimizer(params, cfg)
        resp, mask = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.ones(2, 3)
        est = {"rewards": torch.tensor([[0.0, 0.0, 0.3], [0.1, 0.0, 0.0]]), "logp_ref": torch.zeros(2, 3)}
        sums = step.update(
            model,
            cfg,
            [[1, 2], [3]],
            resp,
            mask,
            est,
            0,
            params,
            optimizer,
            loop.make_scheduler(optimizer, cfg),
            Accelerator(cpu=True),
        )
        assert len(seen) == 2 and all(torch.allclose(m, torch.tensor([want])) for m in seen)
        total = sum(w for _, w in reported)
        assert sums["loss"] == pytest.approx(sum(loss * w / total for loss, w in reported), rel=1e-6)


@pytest.mark.parametrize("loss", ["distill", "pg"])
def test_no_repeat_ngram_bans_repeats_in_the_distill_targets(tiny_path, tokenizer, tmp_path, monkeypatch, loss):
    """estimator.no_repeat_ngram=1: every token already in an answer gets probability 0 in the distill target at each
    later position (and nothing else does): on pi-hat*'s rows always, on the policy rows with loss.type=distill (with pg
    they train on rewards, left finite); the step logs repeat_rate for each group it bans in."""
    import iqstar_lite.algorithm.train as loop

    seen = []
    real_update = loop.update

    def spy(model, cfg, plain_ids, resp, mask, est, *args, guided=None, **kw):
        seen.append((resp, mask, est, guided))
        return real_update(model, cfg, plain_ids, resp, mask, est, *args, guided=guided, **kw)

    monkeypatch.setattr(loop, "update", spy)
    cfg = load_recipe(
        "tiny_cpu",
        [
            f"model.path={tiny_path}",
            "train.steps=1",
            f"loss.type={loss}",
            "rollout.samples_per_prompt=2",
            "rollout.guided_samples=1",
            "rollout.prompts_per_step=2",
            "rollout.max_new_tokens=6",
            "estimator.no_repeat_ngram=1",
            "train.checkpoint_every=0",
        ],
    )
    model = make_policy(tiny_path, randomize_lora=False)
    last = train(cfg, tmp_path, model, tokenizer, load_prompts(cfg.data).train[:2], torch.device("cpu"))
    assert len(seen) == 1
    resp, mask, est, guided = seen[0]
    groups = [(guided.response_ids, guided.response_mask, guided.est["logp_star_full"])]
    assert 0.0 <= last["repeat_rate_guided"] <= 1.0
    if loss == "distill":
        groups.append((resp, mask, est["logp_star_full"]))
        assert 0.0 <= last["repeat_rate"] <= 1.0
    else:
        assert "logp_star_full" not in est and "repeat_rate" not in last
        assert bool(torch.isfinite(est["rewards"][mask > 0]).all())
    for resp, mask, target in groups:
        for b in range(resp.shape[0]):
            for t in range(int(mask[b].sum())):
                banned = torch.isneginf(target[b, t]).nonzero().flatten().tolist()
                assert sorted(banned) == sorted(set(resp[b, :t].tolist())), (b, t)
