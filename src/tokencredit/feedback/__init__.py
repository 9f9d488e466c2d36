"""Feedback sources that label sampled responses (reference heuristics now, AI judges later)."""

from tokencredit.feedback.labelers import ReferenceLabeler, TokenLabeler, label_stats

__all__ = ["ReferenceLabeler", "TokenLabeler", "label_stats"]
