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
