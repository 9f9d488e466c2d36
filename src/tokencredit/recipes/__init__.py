"""Whole-paper pipelines, one file per method, each readable top to bottom.

- ``tppo``: token-level PPO for query generation (`tokencredit demo`).
- ``fg``: fine-grained RLHF from minimal edits (`tokencredit fg`).
- ``ser``: self-evolved reward learning, then PPO on the evolved reward model (`tokencredit ser`).
- ``rlgf``: PPO, PPO++, AggreVaTeD, LOLS and D2LOLS with a guide LLM, side by side (`tokencredit rlgf`).
- ``pgg``: token rewards grounded in sequence rankings, alternating with LM training (`tokencredit pgg`).
"""
