"""Whole-paper pipelines, one file per method, each readable top to bottom.

- ``tppo``: token-level PPO for query generation (`tokencredit demo`).
- ``fg``: fine-grained RLHF from minimal edits (`tokencredit fg`).
- ``ser``: self-evolved reward learning, then PPO on the evolved reward model (`tokencredit ser`).
"""
