"""Word labels for sampled responses: the reference heuristic and the protocol every labeler follows.

The LLM-judge labelers (:mod:`tokencredit.judges.judge_labelers`) implement the same protocol."""

from tokencredit.feedback.reference_labeler import ReferenceLabeler, TokenLabeler, label_stats

__all__ = ["ReferenceLabeler", "TokenLabeler", "label_stats"]
