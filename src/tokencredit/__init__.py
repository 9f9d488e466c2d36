"""tokencredit: reinforcement learning for language models where the reward reaches every token."""

from tokencredit.rl.ppo import PPOConfig, PPOTrainer

__version__ = "0.1.0"
__all__ = ["PPOConfig", "PPOTrainer", "__version__"]
