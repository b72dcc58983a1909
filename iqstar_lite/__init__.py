"""iqstar_lite: Inverse-Q* alignment (token-level RL without preference data) on a laptop.

    from iqstar_lite import IQStarTrainer, load_recipe

    trainer = IQStarTrainer(args=load_recipe("smollm2_cpu"), train_dataset=["Name three colours.", ...],
                            principle="Always answer in French.")
    run_dir = trainer.train()

The names below are the API (``api.py``); the console script ``iqstar-lite`` (``cli.py``) is the same code. Importing
the package is light: torch and transformers load when a function needs them.
"""

__version__ = "0.1.0"

__all__ = [
    "IQStarConfig",
    "IQStarTrainer",
    "LoraSettings",
    "RecipeConfig",
    "UserError",
    "__version__",
    "chat_answers",
    "check_model",
    "evaluate_prompts",
    "export_model",
    "list_recipes",
    "load_recipe",
    "train_recipe",
]

# not chat / check / evaluate / export / train: those are submodules, which the import system binds over such names
_API = {
    "IQStarConfig",
    "IQStarTrainer",
    "chat_answers",
    "check_model",
    "evaluate_prompts",
    "export_model",
    "train_recipe",
}
_CONFIG = {"LoraSettings", "RecipeConfig", "list_recipes", "load_recipe"}


def __getattr__(name: str):
    """Lazy: ``import iqstar_lite`` (and the ONNX chat path, which must run without torch) loads nothing heavy."""
    if name in _API:
        from iqstar_lite import api

        return getattr(api, name)
    if name in _CONFIG:
        from iqstar_lite import config

        return getattr(config, name)
    if name == "UserError":
        from iqstar_lite.errors import UserError

        return UserError
    raise AttributeError(f"module 'iqstar_lite' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
