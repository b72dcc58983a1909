import pytest

from iqstar_lite.config import RecipeConfig, load_recipe, parse_overrides
from iqstar_lite.errors import UserError


def test_defaults_then_recipe_then_overrides():
    cfg = load_recipe("smollm2_cpu", ["train.lr=1e-4", "loss.type=pg", "rollout.top_p=0.9"])
    assert cfg.train.lr == 1e-4 and cfg.loss.type == "pg" and cfg.rollout.top_p == 0.9
    assert cfg.rollout.samples_per_prompt == 2  # from the recipe file
    assert cfg.loss.beta == RecipeConfig().loss.beta  # default


def test_scientific_floats_without_dot():
    """YAML 1.1 reads '1e-4' as a string; float fields still accept it, and reject real words."""
    assert load_recipe("tiny_cpu", ["train.lr=3e-5"]).train.lr == 3e-5
    with pytest.raises(UserError, match="'train.lr' must be float"):
        load_recipe("tiny_cpu", ["train.lr=fast"])


def test_every_problem_at_once():
    with pytest.raises(UserError) as e:
        load_recipe("tiny_cpu", ["train.stepz=1", "loss.beta=-1", "lora.r=0"])
    msg = str(e.value)
    assert "3 problems" in msg and "train.stepz" in msg and "did you mean" in msg
    assert "\n" not in msg


def test_parse_overrides_nested():
    assert parse_overrides(["a.b=1", "a.c=x", "d=true"]) == {"a": {"b": 1, "c": "x"}, "d": True}


@pytest.mark.parametrize("loss", ["pg", "imitation"])
def test_estimator_nucleus_is_refused_for_losses_that_need_finite_rewards(loss):
    """top_p < 1 sets pi* = 0 outside the nucleus: reward -inf for such a sampled token, nan gradients in pg / imitation."""
    with pytest.raises(UserError, match="estimator.top_p"):
        load_recipe("smollm2_cpu", ["estimator.top_p=0.9", f"loss.type={loss}"])


def test_estimator_nucleus_is_accepted_with_distill():
    assert load_recipe("smollm2_cpu", ["estimator.top_p=0.9", "loss.type=distill"]).estimator.top_p == 0.9


def test_no_repeat_ngram_must_not_be_negative():
    with pytest.raises(UserError, match="must be >= 0"):
        load_recipe("smollm2_cpu", ["estimator.no_repeat_ngram=-1"])
    assert load_recipe("smollm2_cpu", ["estimator.no_repeat_ngram=4"]).estimator.no_repeat_ngram == 4


def test_guided_samples_must_leave_on_policy_samples():
    from iqstar_lite.config import load_recipe
    from iqstar_lite.errors import UserError

    assert load_recipe("smollm2_cpu", ["rollout.guided_samples=1"]).rollout.guided_samples == 1
    with pytest.raises(UserError, match="guided_samples"):
        load_recipe("smollm2_cpu", ["rollout.guided_samples=2"])


def test_second_principle_recipe_picks_its_judge():
    from iqstar_lite.evaluation.judges import one_short_sentence, pick_judge

    cfg = load_recipe("smollm2_short")
    assert cfg.data.principle == "Answer in one short sentence." and cfg.data.keep_default_system
    assert pick_judge(cfg.eval.judge, cfg.data.principle) is one_short_sentence


def test_retired_value_is_refused_with_its_reason_and_read_as_its_replacement_in_a_saved_run(tmp_path, caplog):
    """export.onnx_graph=optimum is gone: a recipe or an override naming it gets the reason in one line; a run directory
    whose config.yaml was written before still loads (its exports use the genai graph), with a warning."""
    import yaml

    from iqstar_lite.config import load_run_config, save_config

    with pytest.raises(UserError, match=r"export.onnx_graph=optimum was retired: optimum-onnx .*transformers<4.58"):
        load_recipe("tiny_cpu", ["export.onnx_graph=optimum"])
    save_config(load_recipe("tiny_cpu"), tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    data["export"]["onnx_graph"] = "optimum"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    assert load_run_config(tmp_path).export.onnx_graph == "genai"
    assert "export.onnx_graph=optimum was retired" in caplog.text and "export.onnx_graph=genai" in caplog.text
    with pytest.raises(UserError, match="'export.onnx_graph' must be one of 'genai', got 'onnx'"):
        load_recipe("tiny_cpu", ["export.onnx_graph=onnx"])


def test_a_renamed_key_reads_as_its_new_name_with_a_warning(tmp_path, caplog):
    """model.dense_decoding_gib became model.dense_weights_gib: an override or a saved run naming the old key still
    works (a warning says the new name); both names at once is one problem line."""
    import yaml

    from iqstar_lite.config import apply_overrides, load_run_config, save_config

    assert load_recipe("tiny_cpu", ["model.dense_decoding_gib=0"]).model.dense_weights_gib == 0
    assert "model.dense_decoding_gib was renamed model.dense_weights_gib" in caplog.text
    save_config(load_recipe("tiny_cpu"), tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    data["model"]["dense_decoding_gib"] = data["model"].pop("dense_weights_gib") + 1.5
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    assert load_run_config(tmp_path).model.dense_weights_gib == RecipeConfig().model.dense_weights_gib + 1.5
    with pytest.raises(UserError, match="'model.dense_decoding_gib' is the old name of 'model.dense_weights_gib'"):
        load_recipe("tiny_cpu", ["model.dense_decoding_gib=0", "model.dense_weights_gib=0"])
    # the saved run's old key and an override with the new one: the override wins (``iqstar-lite eval RUN key=value``)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert apply_overrides(saved, ["model.dense_weights_gib=0.25"], "run").model.dense_weights_gib == 0.25


def test_a_list_or_mapping_where_a_value_belongs_is_one_problem_line():
    with pytest.raises(UserError, match=r"'export.onnx_graph' must be one of 'genai', got \['a'\]"):
        load_recipe("tiny_cpu", ["export.onnx_graph=[a]"])
    with pytest.raises(UserError, match=r"'lora.target_modules' must be str, got \{'a': 1\}"):
        load_recipe("tiny_cpu", ["lora.target_modules={a: 1}"])
