"""Deployment half on a tiny random Llama: adapter card, merge, ONNX (+int8), parity gate, torch-free chat.

The fixtures build everything offline: a byte-level BPE tokenizer (vocab 320) with a ChatML template,
a 2-layer Llama (hidden 64), and a fake run directory whose adapter was made by ``load_policy`` on
the NF4 base with non-zero random ``lora_B`` (so the merge changes the weights). The export runs
once per module; tests that break things work on copies.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_lora_b

from iqstar_lite.config import ExportConfig, LoraSettings, ModelConfig, RecipeConfig, load_recipe, save_config
from iqstar_lite.errors import UserError

REPO = Path(__file__).resolve().parent.parent
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPTS = ["What is the capital of Japan?", "Write a haiku about rain."]


def _run(*args: str, block_torch: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if block_torch:  # prove the module never needs torch: any "import torch" raises ImportError
        code = "import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__')"
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, "-m", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    bpe = ByteLevelBPETokenizer()
    corpus = ["The capital of Japan is Tokyo.", "Rain falls softly on the roof.", "Write a short answer, please."] * 20
    bpe.train_from_iterator(
        corpus, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=256, rope_theta=12345.0, initializer_range=0.1, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def _tiny_cfg(model_dir: Path) -> RecipeConfig:
    return RecipeConfig(
        name="tiny",
        model=ModelConfig(path=str(model_dir), quantize="nf4", dtype="auto", device="cpu"),
        lora=LoraSettings(r=4, alpha=8),
        export=ExportConfig(check_prompts=2, check_new_tokens=8, min_int8_agreement=0.5),
    )


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished 'training run': config.yaml, adapter/ (random non-zero LoRA), metrics.jsonl."""
    from iqstar_lite.models.load import load_policy

    run = tmp_path_factory.mktemp("run")
    cfg = _tiny_cfg(tiny_model_dir)
    policy = randomize_lora_b(load_policy(cfg.model, cfg.lora), std=0.05, seed=1)
    policy.save_pretrained(run / "adapter")
    save_config(cfg, run / "config.yaml")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25, "kl": 0.01}\n')
    return run


@pytest.fixture(scope="module")
def exported(run_dir) -> tuple[Path, dict]:
    from iqstar_lite.config import load_run_config
    from iqstar_lite.export.stage import export_run

    return run_dir, export_run(run_dir, load_run_config(run_dir), PROMPTS)


def _prompt_ids(tok, text: str) -> list[int]:
    from iqstar_lite.data.formatting import render_chat

    return render_chat(tok, text)


# ----------------------------------------------------------------------------- adapter + merge


def test_adapter_card_written_and_adapter_reloads(exported, tiny_model_dir):
    from peft import PeftModel

    from iqstar_lite.models.load import load_base

    run, _ = exported
    card = (run / "adapter" / "README.md").read_text()
    for needle in ("Always answer in French.", "beta = 0.1", "alpha = 1", "tiny", "loss 0.25", "kl 0.01"):
        assert needle in card
    cfg = _tiny_cfg(tiny_model_dir)
    model = PeftModel.from_pretrained(load_base(cfg.model), str(run / "adapter"))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


def test_merged_checkpoint_reloads_and_matches_fp32_compute_model(exported, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from iqstar_lite.export.merge import load_trained, prompt_logits
    from iqstar_lite.export.to_gguf import rope_parameters

    run, report = exported
    merged_dir = run / "merged"
    saved = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in saved and rope_parameters(saved)["rope_theta"] == 12345.0
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "generation_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(merged_dir)
    assert tok.chat_template == CHATML

    merge = json.loads((run / "merge.json").read_text())
    assert merge == report["merge"]
    assert merge["max_abs_logit_diff_vs_fp32_compute"] < 1e-4
    assert merge["trained_compute_dtype"] in ("bfloat16", "float32")

    # Independently: reload both and compare on a prompt the export did not see.
    cfg = _tiny_cfg(tiny_model_dir)
    ids = [_prompt_ids(tok, "Rain on the roof of Tokyo?")]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    trained32 = load_trained(ModelConfig(path=cfg.model.path, dtype="fp32", device="cpu"), run / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    a, b, c = prompt_logits(merged, ids)[0], prompt_logits(trained32, ids)[0], prompt_logits(base, ids)[0]
    assert (a - b).abs().max() < 1e-4
    assert (a - c).abs().max() > 1e-2  # the adapter did change the model


def test_dequantized_merge_is_exact_when_training_held_unquantized_parts_in_bf16(run_dir, tmp_path):
    """On CUDA the embeddings / norms / head next to NF4 are bf16 (model.unquantized_dtype=auto); the merged model
    keeps those values, so the fp32 reference must hold them too (it read the fp32 checkpoint: 0.025 off on an H100)."""
    import dataclasses

    from iqstar_lite.config import load_run_config
    from iqstar_lite.export.merge import merge_run

    run = tmp_path / "run"
    shutil.copytree(
        run_dir, run, ignore=shutil.ignore_patterns("merged", "merge.json", "export.json", "check.json", "onnx*")
    )
    cfg = load_run_config(run)
    cfg.model = dataclasses.replace(cfg.model, unquantized_dtype="bf16")
    report = merge_run(run, cfg, PROMPTS)
    assert report["max_abs_logit_diff_vs_fp32_compute"] < 1e-4, report


def test_export_cli_original_base_bf16_without_onnx(run_dir, tmp_path):
    """The real entry point with overrides: merge into the original weights, save bf16, skip ONNX."""
    from safetensors import safe_open

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("merged", "merge.json", "export.json", "check.json"))
    (run / "onnx").mkdir(exist_ok=True)  # a stale export from an earlier merge must not survive
    proc = _run(
        "iqstar_lite.export.stage", str(run), "export.merge_base=original", "export.dtype=bf16", "export.onnx=false"
    )
    assert proc.returncode == 0, proc.stderr
    assert "merged (original, bf16)" in proc.stdout and "includes the NF4 quantization error" in proc.stdout
    assert not (run / "onnx").exists() and not (run / "onnx-int8").exists()
    with safe_open(str(run / "merged" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    merge = json.loads((run / "merge.json").read_text())
    assert merge["merge_base"] == "original" and merge["dtype"] == "bf16"
    # The adapter was trained on NF4 weights: merging into the originals is not exact.
    assert merge["max_abs_logit_diff_vs_fp32_compute"] > 1e-3
    assert json.loads((run / "export.json").read_text())["merge"] == merge
    assert "export.merge_base" not in (run / "config.yaml").read_text()  # the run's config is left alone


# ----------------------------------------------------------------------------- ONNX + parity


def test_export_passes_parity_check(exported):
    from iqstar_lite.config import load_run_config
    from iqstar_lite.export.check import check_run, format_table

    run, report = exported
    assert (run / "onnx" / "model.onnx").is_file() and (run / "onnx-int8" / "model.onnx").is_file()
    assert report["onnx_int8"]["bytes"] < report["onnx"]["bytes"]
    for name in ("tokenizer.json", "generation_config.json", "config.json"):
        assert (run / "onnx" / name).is_file() and (run / "onnx-int8" / name).is_file()

    result = check_run(run, load_run_config(run), PROMPTS)
    assert result["passed"], result["failures"]
    assert result["greedy_equal"] and result["max_logit_diff"] < 1e-4
    assert 0.5 <= result["int8_agreement"] <= 1.0
    assert all(len(r["torch_tokens"]) > 0 for r in result["prompts"])
    assert json.loads((run / "check.json").read_text())["passed"] is True
    assert "PASSED" in format_table(result)
    # GGUF (export.gguf default f16,q8_0) loaded back by transformers: same prompt ids, f16 identical greedy tokens.
    assert sorted(result["gguf"]) == ["f16", "q8_0"]
    import gguf  # the rope base the writer read from rope_parameters (transformers 5's config.json layout)

    field = gguf.GGUFReader(str(run / "gguf" / "model-f16.gguf")).fields["llama.rope.freq_base"]
    assert float(field.parts[field.data[0]][0]) == 12345.0
    for qtype, g in result["gguf"].items():
        assert g["prompt_ids_equal"] and g["tokens_per_s"] > 0 and f"GGUF {qtype} via" in format_table(result)
    assert (
        result["gguf"]["f16"]["greedy_equal"]
        and result["gguf"]["f16"]["max_logit_diff"] < result["gguf"]["q8_0"]["max_logit_diff"]
    )
    assert result["gguf"]["q8_0"]["agreement"] >= 0.5


def test_genai_graph_export_passes_parity_check_and_decodes_batches(exported, tmp_path):
    """The ONNX graph (onnxruntime-genai's builder): parity gate in onnxruntime and genai, int8 twin, right-padded batches."""
    from iqstar_lite.config import load_run_config
    from iqstar_lite.export.check import check_run
    from iqstar_lite.runtimes.ort import OrtGenerator

    run, report = exported
    cfg = load_run_config(run)
    cfg.export.gguf = "none"
    assert (run / "onnx" / "genai_config.json").is_file() and (run / "onnx-int8" / "genai_config.json").is_file()
    import onnx

    ops = {n.op_type for n in onnx.load(str(run / "onnx" / "model.onnx"), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops  # the builder's fused graph
    gen = OrtGenerator(run / "onnx")
    assert "position_ids" not in gen.input_names
    assert report["onnx_int8"]["weights_quantized"] > 0
    result = check_run(run, cfg, PROMPTS)
    assert result["passed"], result["failures"]
    assert result["greedy_equal"] and result["max_logit_diff"] < 1e-3
    # onnxruntime-genai's own runtime (its tokenizer, chat template and generator) gives the merged model's tokens.
    assert (
        result["genai"]["prompt_ids_equal"] and result["genai"]["greedy_equal"] and result["genai"]["tokens_per_s"] > 0
    )
    assert result["genai"]["prompts"][0]["tokens"] == result["prompts"][0]["torch_tokens"]
    assert result["genai-int8"]["prompt_ids_equal"] and result["genai-int8"]["agreement"] >= 0.5
    import onnxruntime_genai as og  # the README's snippet: genai's documented API alone gives the gate's tokens

    model = og.Model(str(run / "onnx"))
    tok = og.Tokenizer(model)
    text = tok.apply_chat_template(json.dumps([{"role": "user", "content": PROMPTS[0]}]), add_generation_prompt=True)
    params = og.GeneratorParams(model)
    n = len(tok.encode(text))
    params.set_search_options(do_sample=False, max_length=n + cfg.export.check_new_tokens)
    g = og.Generator(model, params)
    g.append_tokens(tok.encode(text))
    while not g.is_done():
        g.generate_next_token()
    assert [int(t) for t in g.get_sequence(0)[n:]] == result["prompts"][0]["torch_tokens"]
    del g, model
    chat = _run(
        "iqstar_lite.chat", str(run / "onnx"), PROMPTS[0], "--max-new-tokens", "8", block_torch=True
    )  # genai's runtime
    assert chat.returncode == 0, chat.stderr
    from iqstar_lite.chat import answers

    same = answers(run / "onnx", [PROMPTS[0]], "onnxruntime", 8)[
        0
    ]  # --runtime onnxruntime: OrtGenerator on the same folder
    # Same text; a random model emits invalid UTF-8, whose bytes the two tokenizers replace by one or several U+FFFD.
    assert re.sub("\ufffd+", "?", same) == re.sub("\ufffd+", "?", chat.stdout.strip())

    # The gate fails when genai's tokenizer does not read tokenizer.json as transformers does (the decoder that
    # transformers' GGUF converter writes made onnxruntime-extensions treat the vocabulary as SentencePiece).
    from iqstar_lite.export.check import check_onnx

    bad = _copy_run(run, tmp_path / "bad", "merged", "onnx")
    tok_json = json.loads((bad / "onnx" / "tokenizer.json").read_text())
    replace = {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}
    tok_json["decoder"] = {
        "type": "Sequence",
        "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}, replace, tok_json["decoder"]],
    }
    (bad / "onnx" / "tokenizer.json").write_text(json.dumps(tok_json))
    failed = check_onnx(bad / "onnx", bad / "merged", cfg.export, PROMPTS[:1])
    assert not failed["passed"] and not failed["genai"]["prompt_ids_equal"]
    assert any("onnxruntime-genai's tokenizer gives" in f for f in failed["failures"]), failed["failures"]
    ids = [_prompt_ids(gen.tokenizer, t) for t in (PROMPTS[0], PROMPTS[1], "Tokyo?", PROMPTS[0])]
    assert len({len(i) for i in ids}) == 3
    assert [g.tokens for g in gen.generate_batch(ids, 8)] == [gen.generate(i, 8).tokens for i in ids]
    fixed = gen.generate_batch(ids, 6, stop_at_eos=False)
    assert [g.tokens for g in fixed] == [gen.generate(i, 6, stop_at_eos=False).tokens for i in ids]


TRICKY = [
    "Hello world\n\nA. B.",
    "x\n\n\ny",
    "a\r\n\r\nb",
    "  lead  trail  ",
    "Ünïcödé 日本語 🙂 1234567",
    "don't I'LL x's\tz",
]


def test_genai_tokenizer_rewrite_keeps_transformers_and_fixes_genai(exported, tiny_path, tmp_path):
    """SmolLM2's tokenizer as transformers converts it from GGUF (the embedded model, tiny_cpu). onnxruntime-genai 0.18
    reads it with a ByteLevel decoder alone (transformers 5.25 writes that) as transformers does, and misreads every
    text with the decoder Sequence that transformers 4.x and 5.2 wrote; after ``rewrite`` it gives transformers' ids
    and text, and transformers' own tokenizer is unchanged by the rewrite."""
    import onnxruntime_genai as og
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from iqstar_lite.export.genai_tokenizer import rewrite, write_genai_tokenizer
    from iqstar_lite.export.to_onnx import copy_sidecars

    # As this transformers converted it from GGUF: 4.x and 5.2 write a decoder Sequence, 5.25 ByteLevel alone.
    original = json.loads((Path(tiny_path) / "tokenizer.json").read_text())
    dec = original["decoder"]
    byte_level = next(d for d in [dec, *dec.get("decoders", [])] if d["type"] == "ByteLevel")
    plain = {**original, "decoder": byte_level}
    assert rewrite(plain) == (plain, [])
    # The older converters' decoder, which genai takes for SentencePiece: rewritten to ByteLevel.
    replace = {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}
    steps = [{"type": "ByteFallback"}, {"type": "Fuse"}, replace, byte_level]
    legacy = {**original, "decoder": {"type": "Sequence", "decoders": steps}}
    new, changes = rewrite(legacy)
    assert changes == ["decoder: ByteFallback+Fuse+Replace+ByteLevel -> ByteLevel"] and new == plain
    a, b = Tokenizer.from_str(json.dumps(legacy)), Tokenizer.from_str(json.dumps(new))
    for text in TRICKY:
        ids = a.encode(text, add_special_tokens=False).ids
        assert b.encode(text, add_special_tokens=False).ids == ids and b.decode(ids) == a.decode(ids)
    for other in (
        {"model": {"type": "Unigram"}, "pre_tokenizer": {"type": "Metaspace"}},
        {"model": {"type": "BPE"}, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}},
    ):
        assert rewrite(other) == (other, [])  # left alone: the gate says whether genai reads it

    ref = AutoTokenizer.from_pretrained(tiny_path)
    chat = ref.apply_chat_template([{"role": "user", "content": TRICKY[0]}], add_generation_prompt=True, tokenize=False)
    texts = [chat, *TRICKY]
    folder = tmp_path / "genai"  # a genai folder with the legacy tokenizer files, rewritten as the export does
    shutil.copytree(exported[0] / "onnx", folder)
    copy_sidecars(Path(tiny_path), folder)  # genai's tokenizer reads only these files (not the graph's vocabulary size)
    (folder / "tokenizer.json").write_text(json.dumps(legacy))
    assert write_genai_tokenizer(folder) == changes
    gt = og.Tokenizer(og.Model(str(folder)))
    for text in texts:
        ids = ref(text, add_special_tokens=False)["input_ids"]
        assert [int(t) for t in gt.encode(text)] == ids, text
        assert gt.decode(np.asarray(ids, dtype=np.int32)) == ref.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
    for unfixed, genai_reads_it in ((plain, True), (legacy, False)):
        (folder / "tokenizer.json").write_text(json.dumps(unfixed))
        gt = og.Tokenizer(og.Model(str(folder)))
        same = [[int(t) for t in gt.encode(text)] == ref(text, add_special_tokens=False)["input_ids"] for text in texts]
        assert all(same) if genai_reads_it else not any(same)


def test_gguf_reads_rope_settings_of_both_config_layouts():
    """transformers 5 keeps rope_theta under rope_parameters; 4.x at the top level. Missing means Llama's 10000."""
    from iqstar_lite.export.to_gguf import check_architecture, rope_parameters, rope_scaled

    v5 = {"model_type": "llama", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    v4 = {"model_type": "llama", "rope_theta": 500000.0, "rope_scaling": None}
    assert rope_parameters(v5)["rope_theta"] == 100000.0 and rope_parameters(v4)["rope_theta"] == 500000.0
    assert rope_parameters({"model_type": "llama"})["rope_theta"] == 10000.0
    assert not rope_scaled(v5) and not rope_scaled(v4) and check_architecture(v5) is v5
    for scaled in (
        {"model_type": "llama", "rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}},
        {"model_type": "llama", "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}},
    ):
        assert rope_scaled(scaled)
        with pytest.raises(UserError, match="rope scaling"):
            check_architecture(scaled)


def test_gguf_rotary_permutation_arithmetic():
    """One head of dim 4, rows q = [a0, a1, b0, b1] (rotate-half: a = first half, b = second) -> llama.cpp's
    interleaved [a0, b0, a1, b1]; two heads permute independently; k with fewer heads uses its own count."""
    from iqstar_lite.export.to_gguf import permute_rotary

    w = np.arange(4.0)[:, None] * np.ones((1, 3))
    np.testing.assert_array_equal(permute_rotary(w, 1)[:, 0], [0, 2, 1, 3])
    w2 = np.arange(8.0)[:, None]
    np.testing.assert_array_equal(permute_rotary(w2, 2)[:, 0], [0, 2, 1, 3, 4, 6, 5, 7])


def test_gguf_files_modelfile_and_refusals(exported, tmp_path):
    import gguf

    from iqstar_lite.export.to_gguf import export_gguf

    run, report = exported
    assert sorted(report["gguf"]["files"]) == ["f16", "q8_0"]
    r = gguf.GGUFReader(str(run / "gguf" / "model-q8_0.gguf"))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert (
        types["blk.0.attn_q.weight"] == "Q8_0"
        and types["blk.0.attn_norm.weight"] == "F32"
        and "output.weight" not in types
    )  # tied head
    assert (
        r.fields["tokenizer.chat_template"].contents() == CHATML
        and r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    )
    assert (
        r.fields["tokenizer.ggml.add_bos_token"].contents() is False
    )  # the template starts with <|im_start|>, the BOS
    mf = (run / "gguf" / "Modelfile").read_text()
    assert (
        mf.startswith("FROM ./model-q8_0.gguf\n")
        and 'PARAMETER stop "<|im_end|>"' in mf
        and '<|im_start|>assistant\n"""' in mf
    )
    # the system message once: .System before the turns, system entries of .Messages skipped
    assert mf.count("{{ .System }}") == 1 and '{{- range .Messages }}{{- if ne .Role "system" }}' in mf
    odd = tmp_path / "gpt2"
    shutil.copytree(run / "merged", odd)
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(UserError, match="Llama-architecture"):
        export_gguf(odd, tmp_path / "out", ["f16"])
    assert not (tmp_path / "out").exists()


def test_corrupted_gguf_fails_the_gate_and_a_torn_one_is_refused(exported, tmp_path):
    import gguf

    from iqstar_lite.export.check import check_onnx
    from iqstar_lite.runtimes.gguf_transformers import GgufTransformers

    run, _ = exported
    bad = _copy_run(run, tmp_path / "run", "merged", "onnx", "gguf")
    (bad / "gguf" / "model-q8_0.gguf").unlink()
    from iqstar_lite.export.check import check_run  # a file export.gguf asks for and the gate never saw: not passed

    report = check_run(
        bad,
        load_recipe("tiny_cpu", ["export.check_prompts=1", "export.check_new_tokens=4", "export.int8=false"]),
        PROMPTS[:1],
    )
    assert not report["passed"] and any("model-q8_0.gguf missing" in f for f in report["failures"]), report["failures"]
    r = gguf.GGUFReader(str(bad / "gguf" / "model-f16.gguf"), "r+")
    t = next(t for t in r.tensors if t.name == "token_embd.weight")
    t.data[...] = t.data[::-1]  # the embedding rows in reverse order
    del r
    export = ExportConfig(check_prompts=1, check_new_tokens=4)
    report = check_onnx(bad / "onnx", bad / "merged", export, PROMPTS[:1], gguf_dir=bad / "gguf")
    assert not report["passed"] and not report["gguf"]["f16"]["greedy_equal"]
    assert any(f.startswith("gguf model-f16.gguf prompt 0") and "!= merged" in f for f in report["failures"]), report[
        "failures"
    ]
    data = (bad / "gguf" / "model-f16.gguf").read_bytes()
    (bad / "gguf" / "model-f16.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot be loaded by transformers' GGUF reader"):
        check_onnx(bad / "onnx", bad / "merged", export, PROMPTS[:1], gguf_dir=bad / "gguf")
    with pytest.raises(UserError, match="cannot be loaded by transformers' GGUF reader"):
        GgufTransformers(bad / "gguf" / "model-f16.gguf")


def test_llama_cpp_runs_the_gguf_like_the_merged_model(exported):
    """Where llama-cpp-python is installed (the llamacpp extra): llama.cpp's tokenizer + the GGUF's chat template give the
    merged model's prompt ids, and its greedy tokens on the f16 file are the merged model's; the gate reports both files."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from iqstar_lite.export.check import check_onnx
    from iqstar_lite.runtimes.llamacpp import LlamaCppGenerator

    run, _ = exported
    tok = AutoTokenizer.from_pretrained(run / "merged")
    gen = LlamaCppGenerator(run / "gguf" / "model-f16.gguf", n_ctx=128)
    for text in PROMPTS:
        assert gen.chat_ids(text) == _prompt_ids(tok, text)
    report = check_onnx(
        run / "onnx",
        run / "merged",
        ExportConfig(check_prompts=2, check_new_tokens=8, min_int8_agreement=0.5),
        PROMPTS,
        gguf_dir=run / "gguf",
    )
    assert report["passed"], report["failures"]
    assert (
        report["llama.cpp"]["f16"]["greedy_equal"]
        and report["llama.cpp"]["f16"]["prompt_ids_equal"]
        and report["llama.cpp"]["q8_0"]["agreement"] >= 0.5
    )
    from iqstar_lite.chat import answers, pick_runtime

    path = run / "gguf" / "model-q8_0.gguf"
    assert pick_runtime(path) == "llama.cpp" and len(answers(path, PROMPTS, "llama.cpp", 4)) == 2  # chat serves it


def test_chat_serves_each_format(exported, capsys, tmp_path):
    """An exported folder -> onnxruntime-genai, another ONNX folder -> onnxruntime, a .gguf -> llama.cpp or transformers."""
    from iqstar_lite.chat import main, pick_runtime

    run, _ = exported
    assert (
        main(
            [
                str(run / "gguf" / "model-f16.gguf"),
                PROMPTS[0],
                PROMPTS[1],
                "--max-new-tokens",
                "6",
                "--runtime",
                "transformers",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("[1] ") and "\n[2] " in out
    from iqstar_lite.runtimes.llamacpp import available

    plain = tmp_path / "onnx"  # an ONNX decoder folder without genai_config.json (e.g. optimum's)
    shutil.copytree(run / "onnx", plain, ignore=shutil.ignore_patterns("genai_config.json"))
    assert pick_runtime(run / "onnx") == "genai" and pick_runtime(plain) == "onnxruntime"
    assert pick_runtime(run / "gguf" / "model-q8_0.gguf") == ("llama.cpp" if available() else "transformers")
    for path, runtime, needle in (
        (run / "gguf", "auto", "holds GGUF files"),
        (plain, "genai", "not an onnxruntime-genai folder"),
        (run / "gguf" / "model-q8_0.gguf", "genai", "runs with --runtime llama.cpp or transformers"),
    ):
        with pytest.raises(UserError, match=needle):
            pick_runtime(path, runtime)


def _session(*args: str, stdin: str, block_torch: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = (
        "import sys; "
        + ("sys.modules['torch'] = None; " if block_torch else "")
        + "sys.argv = ['iqstar-lite', 'chat', *sys.argv[1:]]; from iqstar_lite.cli import cli; cli()"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], input=stdin, capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


@pytest.mark.parametrize("client", ["onnxruntime", "genai", "transformers", "llama.cpp"])
def test_chat_repl_scripted_session_per_client(client, exported):
    """``iqstar-lite chat EXPORT`` with prompts on stdin (one per line, /quit ends): each client streams the same answers it
    gives when asked directly (``answers``); the ONNX clients without torch."""
    from iqstar_lite.chat import answers
    from iqstar_lite.runtimes.llamacpp import available

    if client == "llama.cpp" and not available():
        pytest.skip("llama-cpp-python not installed (the llamacpp extra)")
    run = exported[0]
    path = {
        "onnxruntime": run / "onnx",
        "genai": run / "onnx",
        "transformers": run / "gguf" / "model-f16.gguf",
        "llama.cpp": run / "gguf" / "model-q8_0.gguf",
    }[client]
    proc = _session(
        str(path),
        "--runtime",
        client,
        "--max-new-tokens",
        "6",
        stdin=f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n/quit\nnot read\n",
        block_torch=client in ("onnxruntime", "genai"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = answers(path, PROMPTS, client, 6)
    norm = lambda t: re.sub("\ufffd+", "?", t)  # noqa: E731 - invalid UTF-8 of a random model: one or several U+FFFD
    assert norm(proc.stdout) == norm("".join(w + "\n" for w in want))


def test_corrupted_onnx_weight_fails_check_naming_prompt_and_position(exported, tmp_path):
    import onnx
    from onnx import numpy_helper

    run, _ = exported
    bad = tmp_path / "run"
    bad.mkdir()
    shutil.copy2(run / "config.yaml", bad / "config.yaml")
    for name in ("merged", "onnx"):
        shutil.copytree(run / name, bad / name)
    model = onnx.load(str(bad / "onnx" / "model.onnx"))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # embedding or lm_head
    w = numpy_helper.to_array(init) + 0.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(bad / "onnx" / "model.onnx"))

    proc = _run("iqstar_lite.export.check", str(bad / "onnx"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED" in proc.stdout
    assert "prompt 0" in proc.stdout and "position" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert json.loads((bad / "check.json").read_text())["passed"] is False


@pytest.mark.parametrize("method", ["weights", "dynamic"])
def test_int8_methods_and_external_data(exported, tmp_path, method):
    import onnx

    from iqstar_lite.export.to_onnx import copy_sidecars, quantize_int8, uses_external_data
    from iqstar_lite.runtimes.ort import OrtGenerator

    run, report = exported
    assert (
        report["onnx_int8"]["method"] == "weights" and report["onnx_int8"]["weights_quantized"] == 11
    )  # 2 layers x 5 (fused qkv, o, gate, up, down) + the tied head
    # The builder writes external data (model.onnx.data); the int8 twin keeps the input's layout, either way.
    src = tmp_path / "onnx-inline"
    src.mkdir()
    onnx.save_model(onnx.load(str(run / "onnx" / "model.onnx")), str(src / "model.onnx"))
    copy_sidecars(run / "onnx", src)
    assert uses_external_data(run / "onnx" / "model.onnx") and not uses_external_data(src / "model.onnx")
    inline = quantize_int8(src, tmp_path / "int8-inline", method=method)
    assert not inline["external_data"] and not uses_external_data(tmp_path / "int8-inline" / "model.onnx")
    out = quantize_int8(run / "onnx", tmp_path / "int8", method=method)  # external data follows the input
    assert out["external_data"] and uses_external_data(tmp_path / "int8" / "model.onnx")
    assert [f.name for f in (tmp_path / "int8").glob("model.onnx?data")] and (
        tmp_path / "int8" / "tokenizer.json"
    ).is_file()
    ids = [1, 5, 9, 12, 40, 7]
    fp32 = OrtGenerator(run / "onnx", load_tokenizer=False).logits(ids)
    int8 = OrtGenerator(tmp_path / "int8", load_tokenizer=False).logits(ids)
    err = np.abs(int8 - fp32).max()
    assert 0 < err < 0.1 * np.abs(fp32).max()
    if method == "weights":  # the same weights as the module's onnx-int8, stored inline or externally
        for folder in (run / "onnx-int8", tmp_path / "int8-inline"):
            np.testing.assert_allclose(int8, OrtGenerator(folder, load_tokenizer=False).logits(ids), atol=1e-5)


def test_blocked_int8_export_is_closer_to_fp32_than_per_channel(exported, tmp_path):
    from iqstar_lite.export.to_onnx import quantize_int8
    from iqstar_lite.runtimes.ort import OrtGenerator

    run, report = exported
    assert report["onnx_int8"]["block_size"] == 32  # the export default
    out = quantize_int8(run / "onnx", tmp_path / "int8-b16", block_size=16)
    assert out["weights_quantized"] == 11 and out["block_size"] == 16
    assert quantize_int8(run / "onnx", tmp_path / "int8-ch", block_size=0)["block_size"] == "per channel"
    seqs = [[int(i) for i in np.random.default_rng(seed).integers(0, 300, size=12)] for seed in range(4)]

    def logits(folder: Path) -> np.ndarray:
        gen = OrtGenerator(folder, load_tokenizer=False)
        return np.concatenate([gen.logits(ids) for ids in seqs])

    fp32 = logits(run / "onnx")
    err = {name: np.abs(logits(tmp_path / f"int8-{name}") - fp32).mean() for name in ("ch", "b16")}
    assert 0 < err["b16"] < err["ch"], err  # mean over 4 x 12 positions (a max over one sequence is noise here)


def _one_matmul(w: np.ndarray):
    """ONNX model y = x @ w (x [1, K]), w a constant initializer named "w"."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_weight_quantization_arithmetic():
    """W = [[1, -2], [0.5, 4]]: per output column s = [1/127, 4/127]; q = [[127, -64], [64, 127]] (|W - qs| <= s/2)."""
    import onnx
    from onnx import numpy_helper

    from iqstar_lite.export.to_onnx import quantize_matmul_weights_int8

    model = _one_matmul(np.array([[1.0, -2.0], [0.5, 4.0]], dtype=np.float32))
    assert quantize_matmul_weights_int8(model) == 1
    onnx.checker.check_model(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(inits["w_int8"], [[127, -64], [64, 127]])
    np.testing.assert_allclose(inits["w_scale"], [1 / 127, 4 / 127], rtol=1e-6)
    import onnxruntime as ort

    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.array([[1.0, 1.0]], np.float32)}
    )[0]
    np.testing.assert_allclose(y, [[1 + 64 / 127, 4 - 64 * 4 / 127]], rtol=1e-5)  # x = [1, 1]: column sums of q * s


def test_blocked_int8_is_matmulnbits_with_hand_computed_values():
    """K=32, block 16: W[:, 0] = 16 x 1.0 then 15 x 0.25 and -0.5 (s = 1/127, 0.5/127); W[:, 1] = 2.0 (s = 2/127).
    q + 128 is stored unsigned (MatMulNBits' default zero point); 0.25 -> round(63.5) = 64 -> 64 x 0.5/127."""
    import onnx
    from onnx import numpy_helper

    from iqstar_lite.export.to_onnx import quantize_matmul_weights_int8

    w = np.zeros((32, 2), dtype=np.float32)
    w[:16, 0], w[16:31, 0], w[31, 0], w[:, 1] = 1.0, 0.25, -0.5, 2.0
    model = _one_matmul(w)
    assert quantize_matmul_weights_int8(model, block_size=16) == 1
    onnx.checker.check_model(model)
    (node,) = model.graph.node
    assert node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert set(inits) == {"w_q8", "w_q8_scale"}  # the fp32 weight is gone
    q = inits["w_q8"]
    assert q.shape == (2, 2, 16) and q.dtype == np.uint8
    np.testing.assert_array_equal(q[0, 0], [255] * 16)
    np.testing.assert_array_equal(q[0, 1], [192] * 15 + [1])
    np.testing.assert_array_equal(q[1], [[255] * 16] * 2)
    np.testing.assert_allclose(inits["w_q8_scale"], [1 / 127, 0.5 / 127, 2 / 127, 2 / 127], rtol=1e-6)
    import onnxruntime as ort

    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.ones((1, 32), np.float32)}
    )[0]
    np.testing.assert_allclose(y, [[16 + 15 * 64 * 0.5 / 127 - 0.5, 64.0]], rtol=1e-5)  # x = 1 is exact in int8 too


def test_tied_head_transpose_is_quantized_and_embedding_kept():
    """A tied head reads Transpose(E) (E [V, H] also feeds Gather): the head gets an int8 copy of E^T, E stays fp32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from iqstar_lite.export.to_onnx import quantize_matmul_weights_int8

    e = np.array([[1.0, 1.0], [-2.0, 4.0]], dtype=np.float32)  # head W = E^T = [[1, -2], [1, 4]]: s = [1/127, 4/127]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["h"]), helper.make_node("Transpose", ["E"], ["E_t"], perm=[1, 0]),
         helper.make_node("MatMul", ["h", "E_t"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(e, "E")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert quantize_matmul_weights_int8(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "Gather", "MatMul"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(inits["E"], e)
    np.testing.assert_array_equal(inits["E_t_int8"], [[127, -64], [127, 127]])
    import onnxruntime as ort

    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"ids": np.array([0])}
    )[0]
    # h = E[0] = [1, 1] (exact in int8 too, so onnxruntime's int8-activation kernel gives the same): column sums of q * s
    np.testing.assert_allclose(y, [[2.0, 4 - 64 * 4 / 127]], rtol=1e-5)


# ----------------------------------------------------------------------------- torch-free generation


def test_ort_generator_kv_cache_matches_full_forward(exported):
    from iqstar_lite.runtimes.ort import OrtGenerator

    run, _ = exported
    gen = OrtGenerator(run / "onnx")
    ids = _prompt_ids(gen.tokenizer, PROMPTS[1])
    out = gen.generate(ids, 6, stop_at_eos=False, keep_logits=True)
    full = gen.logits(ids + out.tokens)
    np.testing.assert_allclose(np.stack(out.step_logits), full[len(ids) - 1 : len(ids) + 5], atol=1e-4)
    assert out.tokens == [int(t) for t in full[len(ids) - 1 : len(ids) + 5].argmax(-1)]


def test_generate_batch_equals_one_prompt_at_a_time(exported):
    """A right-padded batch (prompts of different lengths) = each prompt alone: same greedy tokens, each row ending
    at its own EOS; seeded sampling is reproducible."""
    from iqstar_lite.runtimes.ort import OrtGenerator

    run, _ = exported
    gen = OrtGenerator(run / "onnx")
    texts = [PROMPTS[0], PROMPTS[1], "Tokyo?", "Rain on the roof of Tokyo, write a short answer please."]
    ids = [_prompt_ids(gen.tokenizer, t) for t in texts]
    assert len({len(i) for i in ids}) > 1  # padding is exercised
    alone = [gen.generate(i, 12).tokens for i in ids]
    batch = [g.tokens for g in gen.generate_batch(ids, 12)]
    assert batch == alone
    fixed = gen.generate_batch(ids, 7, stop_at_eos=False)
    assert [len(g.tokens) for g in fixed] == [7] * 4
    a, b = (gen.generate_batch(ids, 6, sample=True, top_p=0.9, seed=5) for _ in range(2))
    assert [g.tokens for g in a] == [g.tokens for g in b]


def test_sample_token_nucleus():
    from iqstar_lite.runtimes.base import sample_token

    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    # top_p = 0.45: the nucleus is {0} alone (its mass 0.5 already reaches 0.45) -> always token 0.
    assert {sample_token(logits, rng, top_p=0.45) for _ in range(50)} == {0}
    # top_p = 0.7: {0, 1} (mass 0.8) -> renormalized 0.5/0.8 = 0.625 and 0.375; token 2 never drawn.
    draws = [sample_token(logits, rng, top_p=0.7) for _ in range(400)]
    assert set(draws) == {0, 1} and abs(np.mean(np.array(draws) == 0) - 0.625) < 0.08


def test_chat_cli_runs_without_torch(exported):
    run, _ = exported
    greedy = _run("iqstar_lite.chat", str(run / "onnx"), PROMPTS[0], "--max-new-tokens", "5", block_torch=True)
    assert greedy.returncode == 0, greedy.stderr
    sampled = _run(
        "iqstar_lite.chat",
        str(run / "onnx-int8"),
        PROMPTS[0],
        "--sample",
        "--top-p",
        "0.9",
        "--seed",
        "3",
        block_torch=True,
    )
    assert sampled.returncode == 0, sampled.stderr
    batch = _run(
        "iqstar_lite.chat", str(run / "onnx"), PROMPTS[0], PROMPTS[1], "--max-new-tokens", "5", block_torch=True
    )
    assert batch.returncode == 0, batch.stderr
    lines = batch.stdout.strip().splitlines()
    assert lines[0].startswith("[1] ") and lines[-1].startswith("[2] ")
    assert lines[0][4:] == greedy.stdout.strip().splitlines()[0]  # same answer as alone (first line of it)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("module", ["iqstar_lite.export.stage", "iqstar_lite.export.check", "iqstar_lite.chat"])
def test_not_a_run_dir_exits_2_with_one_line(module, tmp_path):
    args = [str(tmp_path)] + (["hello"] if module.endswith("chat") else [])
    proc = _run(module, *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(tmp_path) in lines[0]


def test_export_overrides_only_export_keys(run_dir):
    from iqstar_lite.config import load_run_config
    from iqstar_lite.export.stage import apply_export_overrides

    cfg = apply_export_overrides(load_run_config(run_dir), ["export.int8=false", "export.dtype=bf16"])
    assert cfg.export.int8 is False and cfg.export.dtype == "bf16"
    with pytest.raises(UserError, match="only export"):
        apply_export_overrides(cfg, ["train.lr=1"])
    with pytest.raises(UserError, match="export.dtype"):
        apply_export_overrides(cfg, ["export.dtype=int3"])
    with pytest.raises(UserError, match="export.gguf"):
        apply_export_overrides(cfg, ["export.gguf=f16,q4_k"])


# ----------------------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_smollm2_export_and_check(tmp_path):
    """SmolLM2-135M (embedded), NF4 + random LoRA (std 0.01): merge exact in fp32, fp32 ONNX parity, int8 >= 0.9.

    Measured (2-core CPU): merge vs fp32-compute 1e-4, vs bf16-compute trained 1.2; ONNX max |dlogit| 1.1e-4,
    greedy identical; int8 agreement 0.96; export ~30 s, check ~11 s.
    """
    from iqstar_lite.config import EMBEDDED_MODEL
    from iqstar_lite.export.check import check_run
    from iqstar_lite.export.stage import export_run
    from iqstar_lite.models.load import load_policy

    cfg = RecipeConfig(
        name="smollm2", model=ModelConfig(path=EMBEDDED_MODEL, device="cpu"), lora=LoraSettings(r=16, alpha=32)
    )
    policy = randomize_lora_b(load_policy(cfg.model, cfg.lora), std=0.01, seed=0)
    policy.save_pretrained(tmp_path / "adapter")
    del policy
    save_config(cfg, tmp_path / "config.yaml")

    report = export_run(tmp_path, cfg)
    assert report["merge"]["max_abs_logit_diff_vs_fp32_compute"] < 1e-3
    result = check_run(tmp_path, cfg)
    assert result["passed"], result["failures"]
    assert result["greedy_equal"] and result["int8_agreement"] >= 0.9
    # The default export: genai graph, run by onnxruntime-genai itself; GGUF f16 / q8_0 loaded back by transformers.
    assert (
        result["genai"]["prompt_ids_equal"]
        and result["genai"]["greedy_equal"]
        and result["genai-int8"]["agreement"] >= 0.9
    )
    assert result["gguf"]["f16"]["greedy_equal"] and result["gguf"]["q8_0"]["agreement"] >= 0.9
    if (
        "llama.cpp" in result
    ):  # llama-cpp-python installed (the llamacpp extra): llama.cpp's tokenizer and template agree
        f16, q8 = result["llama.cpp"]["f16"], result["llama.cpp"]["q8_0"]  # f16: exact tokens; q8_0: agreement
        assert f16["prompt_ids_equal"] and f16["greedy_equal"] and q8["prompt_ids_equal"] and q8["agreement"] >= 0.9


@pytest.mark.slow
def test_tiny_cpu_recipe_end_to_end_passes_every_client_gate(tmp_path):
    """tiny_cpu (SmolLM2's GGUF-converted tokenizer, the one onnxruntime-genai misread): train, export, check."""
    proc = _run("iqstar_lite.recipe", "tiny_cpu", f"out_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "check.json").read_text())
    assert report["passed"] and report["genai"]["prompt_ids_equal"] and report["genai"]["greedy_equal"]
    assert report["gguf"]["f16"]["greedy_equal"] and report["gguf"]["f16"]["prompt_ids_equal"]
    assert "onnxruntime-genai (genai):" in proc.stdout and "GGUF f16 via" in proc.stdout


def _copy_run(run: Path, dst: Path, *parts: str) -> Path:
    dst.mkdir()
    shutil.copy2(run / "config.yaml", dst / "config.yaml")
    for name in parts:
        shutil.copytree(run / name, dst / name)
    return dst


@pytest.mark.parametrize("damage, needle", [
    ("torn", "is damaged"),
    ("nan", "holds nan/inf"),
    ("pickle_only", "only safetensors adapters are loaded"),
    ("config", "is not valid JSON"),
])  # fmt: skip
def test_damaged_adapter_is_refused_by_export_with_one_line(run_dir, tmp_path, damage, needle):
    """Export never merges a torn, non-finite or pickled adapter: exit 2, one line, nothing written."""
    from safetensors.torch import load_file, save_file

    bad = _copy_run(run_dir, tmp_path / "run", "adapter")
    weights = bad / "adapter" / "adapter_model.safetensors"
    if damage == "torn":
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage == "nan":
        tensors = load_file(str(weights))
        first = sorted(tensors)[0]
        tensors[first][0, 0] = float("nan")
        save_file(tensors, str(weights))
    elif damage == "pickle_only":
        weights.rename(bad / "adapter" / "adapter_model.bin")
    else:
        (bad / "adapter" / "adapter_config.json").write_text("{not json")
    proc = _run("iqstar_lite.export.stage", str(bad))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in bad.iterdir()) == ["adapter", "config.yaml"]


@pytest.mark.parametrize("module", ["iqstar_lite.export.check", "iqstar_lite.chat"])
def test_corrupted_onnx_file_exits_2_with_one_line(exported, tmp_path, module):
    run, _ = exported
    bad = _copy_run(run, tmp_path / "run", "merged", "onnx")
    (bad / "onnx" / "model.onnx").write_bytes(b"not an onnx model" * 100)
    proc = _run(module, str(bad / "onnx"), *(["hello"] if module.endswith("chat") else ["--no-int8"]))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "cannot be loaded by onnxruntime" in lines[0] and "Traceback" not in proc.stderr


def test_parity_gate_fails_on_nan_logits(exported, tmp_path):
    """A reference with a nan weight gives nan logits: |diff| is nan, which '> limit' would let through; the gate fails."""
    from safetensors.torch import load_file, save_file

    from iqstar_lite.export.check import check_onnx

    run, _ = exported
    bad = _copy_run(run, tmp_path / "run", "merged")
    weights = next((bad / "merged").glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = next(k for k in tensors if "layers.0" in k and k.endswith("weight") and tensors[k].dim() == 2)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    report = check_onnx(run / "onnx", bad / "merged", ExportConfig(check_prompts=2, check_new_tokens=4), PROMPTS)
    assert report["passed"] is False and report["max_logit_diff"] != report["max_logit_diff"]  # nan
    assert any("nan" in f for f in report["failures"])


def _without(modules: list[str], *argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``iqstar-lite ARGV`` in a process where importing any of ``modules`` fails, as if its extra were not installed."""
    code = "import sys; " + "".join(f"sys.modules[{m!r}] = None; " for m in modules)
    code += "sys.argv = ['iqstar-lite', *sys.argv[1:]]; from iqstar_lite.cli import cli; cli()"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def test_a_missing_extra_is_one_line_naming_the_install(exported, tmp_path):
    """Deployment stacks are extras: without one, chat and a recipe that exports stop with one line naming the
    ``pip install`` (the recipe before it trains), exit 2, no traceback."""
    run, _ = exported
    for modules, argv, extra in (
        (["onnxruntime_genai"], ["chat", str(run / "onnx"), PROMPTS[0]], "genai"),
        (["onnxruntime"], ["chat", str(run / "onnx"), PROMPTS[0], "--runtime", "onnxruntime"], "onnx"),
        (["onnx_ir"], ["train", "tiny_cpu", f"out_dir={tmp_path / 'run'}", "train.steps=1"], "onnx"),  # the builder's
    ):
        proc = _without(modules, *argv)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert (
            line.startswith(f"error: {modules[0]} is not installed") and f"pip install 'iqstar_lite[{extra}]'" in line
        )
    assert not (tmp_path / "run" / "adapter").exists()  # refused before training
    proc = _without(["onnxruntime_genai", "onnxruntime", "onnx"], "train", "tiny_cpu", f"out_dir={tmp_path / 'r2'}",
                    "train.steps=1", "eval.enabled=false", "export.onnx=false", "export.gguf=none")  # fmt: skip
    assert proc.returncode == 0 and (tmp_path / "r2" / "merged").is_dir(), proc.stderr[-2000:]  # training needs none


def _toy_decoder_with_position_ids(folder: Path, vocab: int = 8) -> Path:
    """An ONNX decoder in optimum's layout (``position_ids`` input, one layer of KV cache) whose next token is
    (the sum of the unmasked token ids in its cache + the current position) mod ``vocab``: a pad that is not masked,
    or a position that is off, changes its tokens."""
    from onnx import TensorProto, helper, numpy_helper, save

    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["b", "t"]),
        helper.make_tensor_value_info("attention_mask", i64, ["b", "all"]),
        helper.make_tensor_value_info("position_ids", i64, ["b", "t"]),
        helper.make_tensor_value_info("past_key_values.0.key", f, ["b", 1, "p", 1]),
        helper.make_tensor_value_info("past_key_values.0.value", f, ["b", 1, "p", 1]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", f, ["b", "t", vocab]),
        helper.make_tensor_value_info("present.0.key", f, ["b", 1, "all", 1]),
        helper.make_tensor_value_info("present.0.value", f, ["b", 1, "all", 1]),
    ]
    consts = {
        "axes13": np.array([1, 3], dtype=np.int64),
        "axes123": np.array([1, 2, 3], dtype=np.int64),
        "axis1": np.array([1], dtype=np.int64),
        "axis2": np.array([2], dtype=np.int64),
        "vocab": np.array(float(vocab), dtype=np.float32),
        "range": np.arange(vocab, dtype=np.float32),
    }
    node = helper.make_node
    nodes = [
        node("Cast", ["input_ids"], ["ids_f"], to=f),
        node("Unsqueeze", ["ids_f", "axes13"], ["new_k"]),
        node("Concat", ["past_key_values.0.key", "new_k"], ["present.0.key"], axis=2),
        node("Cast", ["position_ids"], ["pos_f"], to=f),
        node("Unsqueeze", ["pos_f", "axes13"], ["new_v"]),
        node("Concat", ["past_key_values.0.value", "new_v"], ["present.0.value"], axis=2),
        node("Cast", ["attention_mask"], ["mask_f"], to=f),
        node("Unsqueeze", ["mask_f", "axes13"], ["mask4"]),
        node("Mul", ["present.0.key", "mask4"], ["kept"]),
        node("ReduceSum", ["kept", "axes123"], ["total"], keepdims=0),
        node("Unsqueeze", ["total", "axis1"], ["total2"]),
        node("Add", ["total2", "pos_f"], ["score"]),
        node("Mod", ["score", "vocab"], ["target"], fmod=1),
        node("Unsqueeze", ["target", "axis2"], ["target3"]),
        node("Sub", ["range", "target3"], ["diff"]),
        node("Mul", ["diff", "diff"], ["sq"]),
        node("Neg", ["sq"], ["logits"]),
    ]
    init = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    graph = helper.make_graph(nodes, "toy", inputs, outputs, init)
    folder.mkdir(parents=True)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 5}))  # also the pad id (no tokenizer)
    return folder


def test_ort_generator_left_pads_a_graph_that_takes_position_ids(tmp_path):
    """A decoder in optimum's layout (e.g. from optimum-onnx in an environment of its own) runs in OrtGenerator: its
    batches are left-padded with positions from each row's first real token, and decode as each row alone."""
    from iqstar_lite.runtimes.ort import OrtGenerator

    gen = OrtGenerator(_toy_decoder_with_position_ids(tmp_path / "toy"), load_tokenizer=False)
    assert "position_ids" in gen.input_names and gen.pad_id == 5
    alone = gen.generate([3, 1, 2], 5, stop_at_eos=False).tokens
    expect, seen = [], [3, 1, 2]  # by hand: next = (sum of the ids so far + the position of the last one) mod 8,
    for _ in range(5):  # and 4 for 5 (EOS, suppressed by stop_at_eos=False: 4 and 6 are nearest, argmax takes 4)
        t = (sum(seen) + len(seen) - 1) % 8
        expect.append(4 if t == 5 else t)
        seen.append(expect[-1])
    assert alone == expect
    rows = [[3, 1, 2], [5], [2, 2, 2, 2, 6], [1, 4]]
    batch = gen.generate_batch(rows, 5, stop_at_eos=False)
    assert [g.tokens for g in batch] == [gen.generate(r, 5, stop_at_eos=False).tokens for r in rows]


def test_a_gguf_file_becomes_a_plain_checkpoint_with_the_same_logits(exported, tmp_path):
    """How the embedded model (a GGUF file) becomes a training checkpoint: transformers refuses to save a model loaded
    with gguf_file= (5.25 marks it GGUF-quantized); ``_dense_model`` gives one that saves, with the same logits."""
    from transformers import AutoModelForCausalLM

    from iqstar_lite.models.embedded import _dense_model

    path = exported[0] / "gguf" / "model-q8_0.gguf"
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    dense = _dense_model(path)
    dense.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()
    x = torch.tensor([[1, 5, 9, 12, 40, 7]])
    with torch.no_grad():
        assert torch.equal(again(x).logits, loaded(x).logits)
