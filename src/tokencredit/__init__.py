"""tokencredit: reinforcement learning for language models where the reward reaches every token."""

from tokencredit.rl.pgg_trainer import PGGConfig, PGGTrainer
from tokencredit.rl.ppo import PPOConfig, PPOTrainer

__version__ = "0.1.0"
__all__ = ["PGGConfig", "PGGTrainer", "PPOConfig", "PPOTrainer", "__version__"]
