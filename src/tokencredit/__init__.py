"""tokencredit: reinforcement learning for language models where the reward reaches every token."""

__version__ = "0.1.0"
