"""iqstar_lite: Inverse-Q* alignment (token-level RL without preference data) on a laptop."""

__version__ = "0.1.0"
