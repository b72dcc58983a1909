"""Bring your own model: start from an existing peft adapter (model.adapter), a hub revision, trust_remote_code (off
unless asked, said in the error), the attention implementation."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import make_policy

from iqstar_lite.algorithm.train import train
from iqstar_lite.config import ModelConfig, load_recipe
from iqstar_lite.data.sources import load_prompts
from iqstar_lite.errors import UserError
from iqstar_lite.models.load import load_base, load_model_config, load_policy, load_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore")


def _lora(model) -> dict[str, torch.Tensor]:
    return {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_training_continues_from_an_existing_adapter(tiny_path, tokenizer, tmp_path):
    """model.adapter=PATH: the policy starts with exactly the adapter's weights (trainable), and training moves them
    from there (a small step away), not from a fresh LoRA (B = 0)."""
    start = make_policy(tiny_path, seed=3)  # LoRA B randomized: far from a fresh init
    start.save_pretrained(tmp_path / "sft")
    saved = _lora(start)
    cfg = load_recipe(
        "tiny_cpu",
        [
            f"model.path={tiny_path}",
            f"model.adapter={tmp_path / 'sft'}",
            "lora.r=8",
            "train.steps=1",
            "rollout.prompts_per_step=2",
            "rollout.max_new_tokens=4",
            "train.checkpoint_every=0",
            "train.lr=1e-3",
        ],
    )
    model = load_policy(cfg.model, cfg.lora, torch.device("cpu"))
    loaded = _lora(model)
    assert loaded.keys() == saved.keys() and all(
        torch.equal(loaded[k], saved[k]) for k in saved
    )  # its r=4, not lora.r=8
    run = tmp_path / "run"
    run.mkdir()
    train(cfg, run, model, tokenizer, load_prompts(cfg.data).train[:2], torch.device("cpu"))
    after = _lora(model)
    moved = max(float((after[k] - saved[k]).abs().max()) for k in saved)
    assert 0 < moved < 0.01  # continued: moved by about lr per step, not reset
    assert (
        max(float(saved[k].abs().max()) for k in saved if "lora_B" in k) > 0.05
    )  # which a fresh LoRA (B = 0) would not be near
    from safetensors.torch import load_file

    written = load_file(str(run / "adapter" / "adapter_model.safetensors"))  # RUN_DIR/adapter: the continued adapter
    assert written.keys() == after.keys() and all(torch.equal(written[k], after[k]) for k in after)


def test_dry_run_estimates_the_start_adapters_lora(tiny_path, tmp_path):
    from iqstar_lite.models.load import lora_in_use
    from iqstar_lite.models.memory import estimate_memory

    start = make_policy(tiny_path)
    start.save_pretrained(tmp_path / "sft")
    cfg = load_recipe(
        "tiny_cpu",
        [f"model.path={tiny_path}", f"model.adapter={tmp_path / 'sft'}", "lora.r=64", "lora.target_modules=q_proj"],
    )
    cfg.lora = lora_in_use(cfg.model, cfg.lora)
    assert cfg.lora.r == 4 and cfg.lora.alpha == 8
    lora = sum(p.numel() for p in start.parameters() if p.requires_grad)
    assert estimate_memory(cfg, load_model_config(tiny_path)).params_lora == lora


def test_bad_start_adapter_gives_one_line(tiny_path, tmp_path):
    with pytest.raises(UserError, match="model.adapter=.* is not a peft adapter folder.*save_pretrained"):
        load_policy(ModelConfig(path=tiny_path, adapter=str(tmp_path)), load_recipe("tiny_cpu").lora)
    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    (bin_only / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (bin_only / "adapter_model.bin").write_bytes(b"a pickle is never loaded")
    with pytest.raises(UserError, match="no adapter_model.safetensors .*never a pickled .bin"):
        load_policy(ModelConfig(path=tiny_path, adapter=str(bin_only)), load_recipe("tiny_cpu").lora)


def test_start_adapters_peft_cannot_train_here_are_refused(tiny_path, tmp_path):
    from safetensors.torch import save_file

    for name, extra, message in (
        ("dora", {"use_dora": True}, "DoRA adapter"),
        ("whole", {"modules_to_save": ["lm_head"]}, "trains whole modules"),
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **extra}))
        save_file({"base_model.model.x.lora_A.weight": torch.zeros(4, 8)}, str(folder / "adapter_model.safetensors"))
        with pytest.raises(UserError, match=message):
            load_policy(ModelConfig(path=tiny_path, adapter=str(folder)), load_recipe("tiny_cpu").lora)


def test_export_of_custom_code_models_is_refused_in_one_line(tmp_path):
    from iqstar_lite.export.stage import export_run

    cfg = load_recipe("tiny_cpu", ["model.trust_remote_code=true"])
    with pytest.raises(UserError, match="custom code .*not supported.*stages=train"):
        export_run(tmp_path, cfg)


@pytest.fixture()
def hub_cache(tiny_path, tmp_path, monkeypatch):
    """A hub cache as huggingface_hub lays it out, read offline: org/tiny with branches main and v2 (v2's config carries
    a marker), the weights of the tiny model in both snapshots."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--org--tiny"
    for branch, sha in (("main", "a" * 40), ("v2", "b" * 40)):
        snap = repo / "snapshots" / sha
        shutil.copytree(
            tiny_path,
            snap,
            copy_function=os.link if os.stat(tiny_path).st_dev == os.stat(tmp_path).st_dev else shutil.copy2,
        )
        cfg = json.loads((snap / "config.json").read_text())
        (snap / "config.json").unlink()
        (snap / "config.json").write_text(json.dumps({**cfg, "iq_marker": branch}))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / branch).write_text(sha)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at each load
    return "org/tiny"


def test_revision_and_attention_implementation_reach_the_model(hub_cache):
    model = load_base(
        ModelConfig(path=hub_cache, revision="v2", quantize="none", attn_implementation="eager", device="cpu")
    )
    assert model.config.iq_marker == "v2" and model.config._attn_implementation == "eager"
    assert load_model_config(hub_cache).iq_marker == "main"
    assert load_tokenizer(hub_cache, revision="v2").name_or_path == hub_cache  # read from the v2 snapshot, offline
    from iqstar_lite.models.mapped import checkpoint_file

    assert (
        checkpoint_file(hub_cache, "model.embed_tokens.weight", "v2").parent.name == "b" * 40
    )  # the mapped embeddings' file
    assert checkpoint_file(hub_cache, "model.embed_tokens.weight").parent.name == "a" * 40
    with pytest.raises(
        UserError, match="cannot load the config of model 'org/tiny'.*check model.path and model.revision"
    ):
        load_model_config(hub_cache, revision="v3")
    with pytest.raises(
        UserError, match=r"model.attn_implementation='flash_attention_9' cannot be used here .*choose eager or sdpa"
    ):
        load_base(ModelConfig(path=hub_cache, quantize="none", attn_implementation="flash_attention_9", device="cpu"))


def test_remote_code_runs_only_when_trusted(tmp_path):
    """A model folder whose config names its own Python class: refused by default with the setting to change, loaded with
    model.trust_remote_code=true."""
    (tmp_path / "configuration_foo.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass FooConfig(LlamaConfig):\n    model_type = 'foo-custom'\n"
    )
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"model_type": "foo-custom", "auto_map": {"AutoConfig": "configuration_foo.FooConfig"}, "hidden_size": 64}
        )
    )
    with pytest.raises(
        UserError, match="needs the Python code its repository ships.*set model.trust_remote_code=true to run it"
    ):
        load_model_config(str(tmp_path))
    config = load_model_config(str(tmp_path), trust_remote_code=True)
    assert type(config).__name__ == "FooConfig" and config.hidden_size == 64
