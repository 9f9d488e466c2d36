"""Every judge prompt in one readable place. Each can be replaced by a text file (``load_template``).

A template is a system message and a user message with ``{placeholders}``; a file override holds the user
message, optionally preceded by a system message and a line ``---``. The placeholders a task needs must all
appear in an override, or loading fails with the missing names.

Placeholders are plain ``{name}``s: a format spec (``{prompt:>50000000}``), a conversion (``{prompt!r}``),
attribute or index access (``{prompt.x}``, ``{prompt[0]}``) or a positional ``{}`` is refused when the template
is made. A spec could pad one record into a prompt of any size, and the rest have no use in a prompt. How long
a built prompt may be is the backend's ``max_prompt_chars``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path


def _check_placeholders(text: str) -> None:
    """ValueError unless every replacement field of ``text`` is a plain ``{name}``."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"not a valid format string ({exc}); write a literal brace as {{{{ or }}}}") from exc
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        written = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if len(written) > 60:
            written = written[:57] + "..."
        if not name.isidentifier():
            why = "is not a name (positional, attribute or index fields are not filled)"
        elif conversion:
            why = f"has a conversion (!{conversion})"
        elif spec:
            why = "has a format spec, which could pad a value to any length"
        else:
            continue
        raise ValueError(f"placeholder {written} {why}: templates take plain {{name}} placeholders only; write a "
                         "literal brace as {{ or }}")


@dataclass(frozen=True)
class Template:
    """A system message and a user message with named placeholders (plain ``{name}`` only)."""

    system: str
    user: str

    def __post_init__(self) -> None:
        """Refuse a user message whose placeholders are not all plain names."""
        _check_placeholders(self.user)

    def messages(self, **values: str) -> list[dict]:
        """Chat messages with the placeholders filled in."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        return out + [{"role": "user", "content": self.user.format(**values)}]

    def fixed_chars(self) -> int:
        """Characters every prompt built from this template has before any value is filled in."""
        return len(self.system) + sum(len(literal) for literal, _, _, _ in string.Formatter().parse(self.user))

    def fields(self) -> set[str]:
        """Placeholder names of the user message."""
        return {name for _, name, _, _ in string.Formatter().parse(self.user) if name}


PAIRWISE = Template(
    system="You are a careful, impartial judge of answers. You never favour an answer for its position or length.",
    user="Question:\n{prompt}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n"
         "Which answer is better: more helpful, correct and harmless? Reply with one letter, A or B.",
)

RUBRIC = Template(
    system="You are a careful judge who scores answers with an additive 5-point rubric.",
    user="Question:\n{prompt}\n\nAnswer:\n{response}\n\n"
         "Score the answer by adding points:\n"
         "- 1 point if it is relevant to the question, even if incomplete;\n"
         "- 1 more if it addresses a substantial part of the question;\n"
         "- 1 more if it answers the basic elements of the question usefully;\n"
         "- 1 more if it is clear, complete and well organised;\n"
         "- 1 more if it is excellent: accurate, focused, with nothing superfluous.\n"
         "End your reply with a line 'Score: N' where N is 1 to 5.",
)

SPANS = Template(
    system="You are a careful judge who points at the exact words that make an answer better or worse.",
    user="Question:\n{prompt}\n\nAnswer:\n{response}\n\n"
         "Copy the phrases of the answer that are wrong, irrelevant or harmful, one per line starting with '- ', "
         "and the phrases that are especially good, one per line starting with '+ '. Copy each phrase exactly "
         "as it appears in the answer. A word that repeats a word used earlier in the answer is bad. Each line "
         "marks the first occurrence not marked by an earlier line, so to mark a repeat, mark the earlier "
         "occurrence first: for 'cheap hotel hotel', '+ hotel' then '- hotel'. Reply with these lines only; "
         "reply 'none' if there is nothing to mark.",
)

EDIT = Template(
    system="You are a careful editor who fixes answers with the fewest possible changes.",
    user="Question:\n{prompt}\n\nAnswer:\n{response}\n\n"
         "Rewrite the answer with the smallest edits that fix what is wrong, irrelevant or harmful in it, keeping "
         "every good part word for word. Reply with the rewritten answer only.",
)

DEFAULTS: dict[str, Template] = {"pairwise": PAIRWISE, "rubric": RUBRIC, "spans": SPANS, "edits": EDIT}
REQUIRED: dict[str, set[str]] = {"pairwise": {"prompt", "first", "second"}, "rubric": {"prompt", "response"},
                                 "spans": {"prompt", "response"}, "edits": {"prompt", "response"}}


def load_template(task: str, path: str | Path | None = None) -> Template:
    """The task's template: the built-in one, or the file's (system, ``---`` line, user; or just user)."""
    if task not in DEFAULTS:
        raise ValueError(f"unknown judge task {task!r}; use one of {sorted(DEFAULTS)}")
    if path is None:
        return DEFAULTS[task]
    text = Path(path).read_text()
    lines = text.split("\n")
    if "---" in [line.strip() for line in lines]:
        cut = [line.strip() for line in lines].index("---")
        system, user = "\n".join(lines[:cut]).strip(), "\n".join(lines[cut + 1 :]).strip()
    else:
        system, user = DEFAULTS[task].system, text.strip()
    try:
        template = Template(system, user)
    except ValueError as exc:
        raise ValueError(f"template {path}: {exc}") from exc
    missing = REQUIRED[task] - template.fields()
    if missing:
        raise ValueError(f"template {path} lacks the placeholder(s) {sorted(missing)} that task {task!r} fills")
    unknown = template.fields() - REQUIRED[task]
    if unknown:
        raise ValueError(f"template {path} has placeholder(s) {sorted(unknown)} that task {task!r} cannot fill "
                         f"(it fills {sorted(REQUIRED[task])})")
    return template
