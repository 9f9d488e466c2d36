"""The judge's error type, in a module of its own so the cache and the backends can both raise it."""

from __future__ import annotations


class JudgeError(RuntimeError):
    """A judge failure that stops the job: wrong endpoint, key or model, a redirect, retries exhausted, a broken
    cache, or a job in which no record got a label."""
