"""Sample answers while training: every ``eval.every`` steps and at the end, the first ``eval.samples`` held-out prompts
answered greedily with the principle absent (as at inference), appended to RUN_DIR/samples.jsonl (step, prompt, answer,
judge) and shown in the trackers as text. One line per prompt and step; a resumed run drops the lines of steps after its
checkpoint (``checkpoint.keep_metrics_until``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from iqstar_lite.algorithm.rollout import model_eos_ids
from iqstar_lite.config import RecipeConfig
from iqstar_lite.data.formatting import Formatter
from iqstar_lite.data.sources import Example
from iqstar_lite.evaluation.evaluate import greedy_answers
from iqstar_lite.rundir import RunDir
from iqstar_lite.tracking import log_samples


def samples_due(step: int, cfg: RecipeConfig) -> bool:
    """After training step ``step`` (1-based): every ``eval.every`` steps and at the last one."""
    every = cfg.eval.every
    return cfg.eval.samples > 0 and (step == cfg.train.steps or (every > 0 and step % every == 0))


class SampleWriter:
    """``train(on_step=...)`` hook of the main process: answers the samples when due, appends them to samples.jsonl and
    logs them to the trackers."""

    def __init__(
        self,
        model,
        tokenizer,
        fmt: Formatter,
        examples: list[Example],
        cfg: RecipeConfig,
        judge,
        run_dir: Path,
        accelerator,
    ):
        self.model, self.tokenizer, self.fmt, self.cfg, self.judge = model, tokenizer, fmt, cfg, judge
        self.accelerator = accelerator
        self.examples = examples[: cfg.eval.samples]
        self.path = RunDir(run_dir).samples

    def answers(self, step: int) -> list[dict]:
        """The sample rows of one step. The RNG is left as it was (greedy decoding; a resumed run stays bit-exact)."""
        model, tokenizer = self.model, self.tokenizer
        with torch.random.fork_rng(devices=[]):
            eos = model_eos_ids(model, tokenizer)
            _, _, texts, _ = greedy_answers(
                model, tokenizer, self.fmt, self.examples, self.cfg.eval.max_new_tokens, eos
            )
        judge = self.judge
        return [
            {"step": step, "prompt": ex.text, "answer": text, "judge": judge(text) if judge else None}
            for ex, text in zip(self.examples, texts)
        ]

    def __call__(self, metrics: dict) -> None:
        step = metrics["step"]
        if not (self.examples and samples_due(step, self.cfg)):
            return
        if step == self.cfg.train.steps and self.cfg.eval.enabled:
            return  # the held-out evaluation that follows answers the same prompts: ``from_evaluation`` writes them
        self.write(self.answers(step), step)

    def from_evaluation(self, records: list[dict], step: int) -> None:
        """The last step's samples: the first rows of the final evaluation (same prompts, greedy, principle absent)."""
        self.write(
            [
                {"step": step, "prompt": r["prompt"], "answer": r["response"], "judge": r.get("judge")}
                for r in records[: len(self.examples)]
            ],
            step,
        )

    def write(self, rows: list[dict], step: int) -> None:
        if not rows:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        log_samples(self.accelerator, rows, step)
