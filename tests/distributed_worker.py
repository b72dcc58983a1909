"""Run under ``torchrun`` (or alone, as one process) by tests/test_distributed.py.

``update OUT LOSS``: one ``train.update`` on a fixed global batch of 4 rows (each process takes rows rank::world), SGD
with lr 1 so the parameter change is the clipped, averaged gradient; the main process writes the LoRA tensors to OUT.
``recipe ARGS...``: ``python -m iqstar_lite.recipe ARGS`` with each process's rollout prompts appended to
RUN/prompts-rank{R}.jsonl (one line per step).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]


def update_on_fixed_batch(out: str, loss: str) -> None:
    import torch
    from accelerate import Accelerator
    from conftest import make_policy
    from safetensors.torch import save_file

    from iqstar_lite.algorithm.train import make_scheduler
    from iqstar_lite.algorithm.update import Guided, update
    from iqstar_lite.config import load_recipe
    from iqstar_lite.models.embedded import resolve_model_path

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    cfg = load_recipe("tiny_cpu", [f"loss.type={loss}", "train.micro_batch=1", "loss.epochs=1"])
    model = make_policy(resolve_model_path("embedded:tiny-random"), quantize="nf4")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = accelerator.prepare_optimizer(torch.optim.SGD(params, lr=1.0))
    scheduler = make_scheduler(optimizer, cfg)
    forward_model = accelerator.prepare_model(model) if world > 1 else model
    g = torch.Generator().manual_seed(0)
    plain = [[1, 40, 41, 42], [1, 50, 51], [1, 60, 61, 62, 63], [1, 70]]
    resp = torch.randint(5, 300, (4, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    vocab = model.get_output_embeddings().weight.shape[0]
    est = {
        "rewards": torch.randn(4, 5, generator=g),
        "logp_ref": -torch.rand(4, 5, generator=g) * 3,
        "logp_star_full": torch.log_softmax(torch.randn(4, 5, vocab, generator=g), -1),
    }
    logp_sampled = -torch.rand(4, 5, generator=g) * 3
    rows = slice(rank, None, world)
    part = {k: v[rows] for k, v in est.items()}
    guided = None
    if loss == "distill":  # the guided group too: two groups of rows, token-weighted together
        guided = Guided(
            [plain[i] for i in range(4)][rows],
            resp.flip(0)[rows],
            mask.flip(0)[rows],
            {k: v.flip(0)[rows] for k, v in est.items()},
        )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    sums = update(
        model,
        cfg,
        plain[rows],
        resp[rows],
        mask[rows],
        part,
        0,
        params,
        optimizer,
        scheduler,
        accelerator,
        guided=guided,
        logp_sampled=logp_sampled[rows],
        forward_model=forward_model,
    )
    if accelerator.is_main_process:
        delta = {n: (before[n] - p.detach()).contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(delta, out, metadata={"grad_norm": str(sums["grad_norm"])})
    accelerator.wait_for_everyone()


def recipe(args: list[str]) -> None:
    import iqstar_lite.algorithm.train as train_mod
    from iqstar_lite.errors import run_cli
    from iqstar_lite.recipe import main

    out = next(a.split("=", 1)[1] for a in args if a.startswith("out_dir="))
    real = train_mod.rollout_step

    def recording(model, tokenizer, plain, cond, cfg):
        with open(Path(out) / f"prompts-rank{os.environ.get('RANK', '0')}.jsonl", "a") as f:
            f.write(json.dumps(plain) + "\n")
        return real(model, tokenizer, plain, cond, cfg)

    train_mod.rollout_step = recording
    sys.argv = ["iqstar-lite", *args]
    run_cli(main)


if __name__ == "__main__":
    if sys.argv[1] == "update":
        update_on_fixed_batch(sys.argv[2], sys.argv[3])
    else:
        recipe(sys.argv[2:])
