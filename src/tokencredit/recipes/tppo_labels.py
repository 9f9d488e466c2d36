"""The demo's labels: sampling queries from the SFT policy and labelling their words, the records they are kept
as, and how labels become reward-model training data (end labels, label sums, pairs, the miss cost)."""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tokencredit.generation import generate
from tokencredit.recipes.stages import progress_over

if TYPE_CHECKING:
    from tokencredit.rewards.labels import SpanLabel
    from tokencredit.rewards.records import TokenExample


if TYPE_CHECKING:
    from tokencredit.recipes.tppo import DemoConfig

log = logging.getLogger(__name__)


def label_samples(cfg: DemoConfig, policy: object, tokenizer: object, labeler: object, chosen: list[int],
                   train: list, train_prompts: list[str], template: object, generator: torch.Generator
                   ) -> tuple[list[dict], int]:
    """Sample ``samples_per_prompt`` queries of ``policy`` for each chosen train session and label their words:
    (records, samples the labeler gave no labels: an unreadable judge answer, no example and no pair)."""
    from tokencredit.feedback.reference_labeler import ReferenceLabeler
    from tokencredit.tasks.querygen import per_example_metrics, session_context

    records = []
    skipped = 0
    with_f1 = isinstance(labeler, ReferenceLabeler)
    for start in progress_over(range(0, len(chosen), 16), "labels", "batch"):
        idx = [i for i in chosen[start : start + 16] for _ in range(cfg.samples_per_prompt)]
        prompts = [train_prompts[i] for i in idx]
        greedy_f1 = {}
        if with_f1:
            # The policy's own greedy query on each prompt, scored like the test scores it: the F1 the miss cost's
            # break-even is taken at (label_miss_cost=auto).
            sessions = chosen[start : start + 16]
            greedy = generate(policy, tokenizer, [train_prompts[i] for i in sessions],
                              max_new_tokens=cfg.max_new_tokens, greedy=True)
            greedy_f1 = {i: per_example_metrics(t.strip(), train[i].target_query)["f1"]
                         for i, t in zip(sessions, greedy.texts)}
        out = generate(policy, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, temperature=1.0,
                       generator=generator)
        texts = [t.strip() for t in out.texts]
        spans = labeler.label(prompts, texts, [session_context(train[i], template) for i in idx])
        for i, text, sp, finished in zip(idx, texts, spans, out.finished.tolist()):
            if sp is None:
                skipped += 1
                continue
            record = {"session": i, "prompt": train_prompts[i], "response": text,
                      "spans": [[s.start, s.end, s.label] for s in sp], "finished": bool(finished),
                      "end_label": end_label(text, sp, bool(finished))}
            if with_f1:  # the reference's verdict on the sample and on the policy's greedy query for its prompt
                record["f1"] = per_example_metrics(text, train[i].target_query)["f1"]
                record["greedy_f1"] = greedy_f1[i]
            records.append(record)
    return records, skipped


def write_records(path: Path, records: list[dict]) -> None:
    """Labelled samples as JSON lines, written whole before the stage is marked done."""
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def read_records(path: Path) -> list[dict]:
    """What :func:`write_records` wrote."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def records_stats(records: list[dict], labeler: object, skipped: int) -> dict:
    """Label counts of a labelling pass, with the judge's unreadable answers when a judge labelled."""
    from tokencredit.feedback.reference_labeler import ReferenceLabeler, label_stats

    stats = label_stats([[span_label(s) for s in r["spans"]] for r in records])
    if not isinstance(labeler, ReferenceLabeler):
        stats["judge_unparseable"] = labeler.stats.unparseable
        stats["judge_unparseable_examples"] = labeler.stats.examples
    stats["skipped_no_labels"] = skipped
    stats["unfinished"] = sum(not r["finished"] for r in records)
    return {"records": len(records), **stats}


MIN_MISS_COST = 0.01  # label_miss_cost=auto never prices a miss below a hundredth of a hit


def miss_cost(cfg: DemoConfig, records: list[dict]) -> float | None:
    """What a -1 label costs against a +1 for these labelled samples (see DemoConfig.label_miss_cost); None for
    "balanced" (equal class weights in the BCE, a miss costing 1 in the pair ranking)."""
    value = cfg.label_miss_cost
    if value == "balanced":
        return None
    if value != "auto":
        return float(value)
    if cfg.judge is not None:
        return 1.0
    scores = [r.get("greedy_f1") for r in records]
    if not scores or any(f is None for f in scores):
        raise ValueError("label_miss_cost=auto prices a miss by the token F1 of the labelling policy's greedy "
                         "queries, and these labels have none (written before the option, or not by the reference "
                         "labeler): label them again (resume=false, or a run without reuse_stages) or set "
                         "label_miss_cost to a number")
    f1 = statistics.fmean(scores)
    return max(f1 / (2.0 - f1), MIN_MISS_COST)


def make_labeler(cfg: DemoConfig, folder: Path) -> object:
    """The demo's token labeler: the reference heuristic, or an LLM judge answering through a cache in folder."""
    from tokencredit.feedback.reference_labeler import ReferenceLabeler

    if cfg.judge is None:
        return ReferenceLabeler(use_clicked=cfg.label_clicked, stopwords_neutral=not cfg.label_stopwords,
                                repeats=cfg.label_repeats)
    from tokencredit.judges.backends import HFBackend, OpenAIBackend
    from tokencredit.judges.judge_labelers import JudgeTokenLabeler

    cache = folder / "judge_cache.sqlite"
    if cfg.judge.startswith("hf:"):
        backend = HFBackend.from_pretrained(cfg.judge[3:], cache=cache)
    else:
        backend = OpenAIBackend(cfg.judge, cfg.judge_model, api_key_env=cfg.judge_api_key_env, cache=cache)
    return JudgeTokenLabeler(backend, repeats=cfg.label_repeats)


def span_label(s: list[int]) -> object:
    """A SpanLabel from its JSON form."""
    from tokencredit.rewards.labels import SpanLabel

    return SpanLabel(int(s[0]), int(s[1]), int(s[2]))


def end_label(response: str, spans: list[SpanLabel], finished: bool) -> int:
    """The label of where a sample ends: a finished one's end token +1 when it holds a +1 word, else -1 (an empty
    or unsupported query should not be ended on); an unfinished one's last token -1 (the length limit never pays)."""
    from tokencredit.rewards.labels import word_units

    if not finished:
        return -1
    return 1 if any(u.label > 0 for u in word_units(response, spans)) else -1


def token_example(r: dict, label_end: bool) -> TokenExample:
    """A labels record as the reward model trains on it; a record without ``finished`` / ``end_label`` (written
    before they existed) is finished with an unlabelled end, as is every record when end labels are off."""
    from tokencredit.rewards.records import TokenExample

    spans = [span_label(s) for s in r["spans"]]
    if not label_end:
        return TokenExample(r["prompt"], r["response"], spans)
    return TokenExample(r["prompt"], r["response"], spans, finished=bool(r.get("finished", True)),
                        end_label=int(r.get("end_label", 0)))


def label_sum(example: TokenExample, tokenizer: object, unit: str, miss_cost: float = 1.0) -> float:
    """The sum of an example's token labels as the reward model's BCE sees them (word units, end label), a -1
    counting ``miss_cost``: the additive quantity its summed token reward is fitted to."""
    from tokencredit.rewards.labels import spans_to_token_labels

    _, labels = spans_to_token_labels(example.response, example.spans, tokenizer, add_eos=example.finished,
                                      unit=unit, end_label=example.end_label)
    return float(sum(v if v > 0 else miss_cost * v for v in labels))


def pairs_from_labels(records: list[dict], rank: str = "share", score: Callable[[dict], float] | None = None,
                       min_gap: float = 0.0) -> list:
    """Preference pairs between samples of one prompt, the better one first; equal samples form none.

    ``rank="sum"``: finished samples only (a pair's texts are scored with an end token appended), ranked by
    ``score`` (the demo: :func:`label_sum`), so pairs are ranked by the quantity the summed reward is fitted to;
    with ``min_gap``, only samples whose scores differ by at least that much pair (the demo: 1, a hit's worth, so
    that two samples with no hit, which token F1 scores alike, are not ranked by their count of cheap misses).
    ``rank="share"``: every sample, ranked by its share of good words (the demo before issue 29).
    """
    from tokencredit.rewards.records import PreferencePair

    if rank not in ("sum", "share"):
        raise ValueError(f"rank must be sum or share (got {rank!r})")
    if rank == "sum" and score is None:
        raise ValueError("rank='sum' needs a score for each record")

    def share(r: dict) -> float:
        labels = [s[2] for s in r["spans"]]
        return sum(1 for v in labels if v > 0) / len(labels) if labels else 0.0

    quality = share if rank == "share" else score
    by_session: dict[int, list[tuple[dict, float]]] = {}
    for r in records:
        if rank == "sum" and not r.get("finished", True):
            continue
        by_session.setdefault(r["session"], []).append((r, quality(r)))

    pairs = []
    for group in by_session.values():
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                (a, qa), (b, qb) = group[i], group[j]
                if qa == qb or a["response"] == b["response"] or abs(qa - qb) < min_gap - 1e-9:
                    continue
                win, lose = (a, b) if qa > qb else (b, a)
                pairs.append(PreferencePair(win["prompt"], win["response"], lose["response"]))
    return pairs
