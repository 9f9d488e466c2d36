"""FG on QA-Feedback: a token RM from human minimal edits vs a sequence RM trained on the same pairs.

Reads ../shared/data (not part of the product; "skipped" when absent):
- edits/qa_feedback_finegrained.jsonl: per question, ``prediction 1``, its human minimal edit
  (``corrected-prediction``) and human error spans over ``prediction 1`` (character offsets);
- preferences/qa_feedback_pairs.jsonl: human pairwise preferences between the 4 predictions of each question.

Per seed the questions are split 75/25. On the training questions, each (prediction 1 -> corrected) edit gives
- the FG token RM: hybrid loss = span Bradley-Terry on the diff's tokens + sequence BT on (edited, original),
  optionally also the per-token BCE variant;
- the sequence RM: Bradley-Terry on the same (edited, original) pairs.
Both start from the same backbone (MiniLM by default) and see the same prompts and lengths. On the held-out
questions we measure
- pairwise accuracy on the human preference pairs (summed token rewards for token RMs), and on the held-out
  (edited > original) edit pairs;
- agreement with the human error spans of ``prediction 1``: ROC AUC of "this unit is in an error span" scored by
  minus the unit's reward, at the token level (token RMs only) and at the sentence level, where a sentence's
  reward is the sum of its token rewards (token RMs) or the change of the sequence score when the sentence is
  appended to the answer so far (sequence RM: S(y<=end of sentence) - S(y<=end of previous sentence));
- for reference, how well the edit diff itself (the training signal) marks the human error spans.

Upper references (variants ``human_pairs`` and ``human_spans``): the same backbone trained on the very labels each
test reads, the human preference pairs and the human error spans of the training questions. When they are at
chance, the design (backbone, length, size) cannot show anything and the edit-trained numbers are not read.

    python benchmarks/fg_qa_feedback.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from tokencredit.rewards.data import EditTriple
from tokencredit.rewards.edits import edit_examples, edit_spans
from tokencredit.rewards.labels import SpanLabel
from tokencredit.rewards.records import PreferencePair, TokenExample
from tokencredit.rewards.seq_rm import SeqRMConfig, SequenceRewardModel, train_sequence_reward_model
from tokencredit.rewards.token_rm import TokenRewardModel
from tokencredit.rewards.token_rm_training import TOKEN_LOSSES, TokenRMConfig, train_token_reward_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def prompt_of(row: dict, max_chars: int) -> str:
    """The question and the start of its passages, in the layout of the FineGrainedRLHF reward models."""
    passages = " ".join(f"wikipage: {p[0]} text: {' '.join(p[1:])}" for p in row["passages"])
    return f"question: {row['question']} context: {' '.join(passages.split())[:max_chars]} answer:"


def auc(scores: list[float], positive: list[bool]) -> float | None:
    """ROC AUC of scores for the positive class (ties count half); None without both classes."""
    s, y = np.asarray(scores, dtype=float), np.asarray(positive, dtype=bool)
    if y.all() or not y.any():
        return None
    order = s.argsort(kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # Average ranks over ties.
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = y.sum(), (~y).sum()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def in_spans(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """Whether [start, end) overlaps any span."""
    return any(start < e and s < end for s, e in spans)


def sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence; the split is at whitespace after . ! or ?."""
    out, pos = [], 0
    for m in _SENTENCE_END.finditer(text):
        out.append((pos, m.start()))
        pos = m.end()
    if pos < len(text.rstrip()):
        out.append((pos, len(text.rstrip())))
    return [(s, e) for s, e in out if e > s]


def sentence_is_error(start: int, end: int, text: str, spans: list[tuple[int, int]]) -> bool:
    """At least half of the sentence's visible characters lie in human error spans."""
    visible = [i for i in range(start, end) if not text[i].isspace()]
    inside = sum(any(s <= i < e for s, e in spans) for i in visible)
    return inside * 2 >= len(visible) > 0


def token_offsets(rm: TokenRewardModel, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The RM's response ids (EOS appended, as it reads them) and each non-EOS token's character span."""
    enc = rm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return rm.encode_response(text), [tuple(o) for o in enc["offset_mapping"]]


def span_agreement(token_rows: list[tuple[list[float], list[tuple[int, int]], str, list]]) -> dict:
    """Token- and sentence-level AUC of -reward for error units, pooled and averaged per answer."""
    tok_scores, tok_labels, sent_scores, sent_labels, per_answer = [], [], [], [], []
    for rewards, offsets, text, spans in token_rows:
        labels = [in_spans(s, e, spans) for s, e in offsets]
        scores = [-r for r in rewards[: len(offsets)]]
        tok_scores += scores
        tok_labels += labels
        per = auc(scores, labels)
        if per is not None:
            per_answer.append(per)
        for s, e in sentences(text):
            sent_scores.append(-sum(r for r, (a, b) in zip(rewards, offsets) if s <= a < e))
            sent_labels.append(sentence_is_error(s, e, text, spans))
    return {"token_auc": auc(tok_scores, tok_labels),
            "token_auc_per_answer": statistics.mean(per_answer) if per_answer else None,
            "sentence_auc": auc(sent_scores, sent_labels), "error_token_share": float(np.mean(tok_labels)),
            "error_sentence_share": float(np.mean(sent_labels))}


def sequence_sentence_agreement(rm: SequenceRewardModel, items: list[tuple[str, str, list]], bs: int) -> dict:
    """Sentence-level AUC of the sequence RM's prefix differences S(y<=sentence) - S(y<before it)."""
    scores, labels = [], []
    for prompt, text, spans in items:
        sents = sentences(text)
        prefixes = [""] + [text[:e] for _, e in sents]
        values = rm.score_sequences([prompt] * len(prefixes), prefixes, bs)
        for (s, e), before, after in zip(sents, values, values[1:]):
            scores.append(-(after - before))
            labels.append(sentence_is_error(s, e, text, spans))
    return {"sentence_auc": auc(scores, labels)}


def diff_agreement(rm: TokenRewardModel, edits: list[tuple[EditTriple, list]]) -> dict:
    """How the edit diff's -1 tokens (the training labels) match the human error-span tokens of the original."""
    tp = fp = fn = 0
    for triple, spans in edits:
        bad, _ = edit_spans(triple.original, triple.edited)
        _, offsets = token_offsets(rm, triple.original)
        bad_spans = [(b.start, b.end) for b in bad]
        for s, e in offsets:
            pred, gold = in_spans(s, e, bad_spans), in_spans(s, e, spans)
            tp += pred and gold
            fp += pred and not gold
            fn += gold and not pred
    return {"diff_precision": tp / (tp + fp) if tp + fp else None,
            "diff_recall": tp / (tp + fn) if tp + fn else None}


def span_examples(items: list[tuple[str, str, list[tuple[int, int]]]]) -> list[TokenExample]:
    """Token-labelled answers from human error spans: characters inside a span -1, the words outside +1."""
    out = []
    for prompt, text, spans in items:
        labels = [SpanLabel(s, min(e, len(text)), -1) for s, e in spans if s < min(e, len(text))]
        labels += [SpanLabel(m.start(), m.end(), 1) for m in re.finditer(r"\S+", text)
                   if not in_spans(m.start(), m.end(), spans)]
        out.append(TokenExample(prompt, text, sorted(labels, key=lambda x: x.start)))
    return out


def pair_accuracy(rm: TokenRewardModel | SequenceRewardModel, pairs: list[PreferencePair], bs: int) -> float:
    """Share of pairs whose chosen response scores higher (summed token rewards for a token RM)."""
    prompts = [p.prompt for p in pairs]
    if isinstance(rm, SequenceRewardModel):
        chosen = rm.score_sequences(prompts, [p.chosen for p in pairs], bs)
        rejected = rm.score_sequences(prompts, [p.rejected for p in pairs], bs)
    else:
        chosen = [sum(r) for r in rm.score(prompts, [p.chosen for p in pairs], bs)]
        rejected = [sum(r) for r in rm.score(prompts, [p.rejected for p in pairs], bs)]
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)


def run_seed(args: argparse.Namespace, seed: int, rows: list[dict], human_pairs: list[dict]) -> dict:
    """Train every variant on one seed's training questions and measure them on its held-out questions."""
    qids = sorted({r["qid"] for r in rows})
    random.Random(seed).shuffle(qids)
    test_q = set(qids[: round(len(qids) * args.test_share)])
    by_q = {r["qid"]: r for r in rows}
    prompts = {q: prompt_of(by_q[q], args.prompt_chars) for q in by_q}
    edits = {q: EditTriple(prompts[q], r["prediction 1"], r["feedback"]["corrected-prediction"])
             for q, r in by_q.items() if r["feedback"].get("corrected-prediction")
             and r["feedback"]["corrected-prediction"].split() != r["prediction 1"].split()}
    train_edits = [e for q, e in edits.items() if q not in test_q]
    test_edits = [e for q, e in edits.items() if q in test_q]
    edit_pairs = [PreferencePair(e.prompt, e.edited, e.original) for e in train_edits]
    test_edit_pairs = [PreferencePair(e.prompt, e.edited, e.original) for e in test_edits]
    test_human = [PreferencePair(prompts[p["qid"]], p["chosen"], p["rejected"]) for p in human_pairs
                  if p["qid"] in test_q and p["qid"] in prompts]
    train_human = [PreferencePair(prompts[p["qid"]], p["chosen"], p["rejected"]) for p in human_pairs
                   if p["qid"] in prompts and p["qid"] not in test_q]
    spans = {q: [(e["start"], e["end"]) for e in r["feedback"]["errors"]] for q, r in by_q.items()}
    span_items = [(prompts[q], by_q[q]["prediction 1"], spans[q]) for q in sorted(test_q) if spans[q]]
    common = dict(seed=seed, num_epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                  max_length=args.max_length, eval_fraction=0.0, progress=False)
    out = Path(args.output) / f"seed{seed}"
    result = {"train_edits": len(train_edits), "test_edits": len(test_edits), "test_human_pairs": len(test_human),
              "test_answers_with_spans": len(span_items), "variants": {}}
    reference = TokenRewardModel.from_pretrained(args.model)
    result["edit_diff_vs_human_spans"] = diff_agreement(
        reference, [(e, spans[q]) for q, e in edits.items() if q in test_q and spans[q]])
    for variant in args.variants:
        started = time.perf_counter()
        if variant == "sequence":
            rm = SequenceRewardModel.from_pretrained(args.model)
            train_sequence_reward_model(rm, SeqRMConfig(output_dir=str(out / variant), **common), edit_pairs)
        elif variant == "human_pairs":
            # upper reference for human pair accuracy: a sequence RM trained on the training questions' own human
            # preference pairs (what the edit-trained RMs are asked to generalise to)
            rm = SequenceRewardModel.from_pretrained(args.model)
            train_sequence_reward_model(rm, SeqRMConfig(output_dir=str(out / variant), **common), train_human)
        elif variant == "human_spans":
            # upper reference for span agreement: a token RM trained by per-token BCE on the human error spans of
            # the training questions' prediction 1 (error characters -1, the rest +1), the label the AUC reads
            rm = TokenRewardModel.from_pretrained(args.model)
            config = TokenRMConfig(output_dir=str(out / variant), balance_labels=True, bce_weight=1.0, bt_weight=0.0,
                                   **common)
            train_token_reward_model(rm, config, token_examples=span_examples(
                [(prompts[q], by_q[q]["prediction 1"], spans[q]) for q in by_q if q not in test_q and spans[q]]))
        else:
            weights = {"bce_weight": 0.0, "bt_weight": 0.0, **TOKEN_LOSSES[variant]}
            rm = TokenRewardModel.from_pretrained(args.model)
            config = TokenRMConfig(output_dir=str(out / variant), balance_labels=True, **weights, **common)
            examples = [ex for e in train_edits for ex in edit_examples(e)[:2]]
            train_token_reward_model(rm, config, token_examples=examples, edits=train_edits)
        train_s = time.perf_counter() - started
        metrics = {"human_pair_accuracy": pair_accuracy(rm, test_human, args.batch_size),
                   "edit_pair_accuracy": pair_accuracy(rm, test_edit_pairs, args.batch_size)}
        if variant in ("sequence", "human_pairs"):
            metrics.update(sequence_sentence_agreement(rm, span_items, args.batch_size))
        else:
            token_rows = []
            for prompt, text, sp in span_items:
                ids, offsets = token_offsets(rm, text)
                token_rows.append((rm.score_token_ids([prompt], [ids])[0], offsets, text, sp))
            metrics.update(span_agreement(token_rows))
        metrics["train_seconds"] = round(train_s, 1)
        metrics["total_seconds"] = round(time.perf_counter() - started, 1)
        result["variants"][variant] = metrics
        print(json.dumps({"seed": seed, "variant": variant, **metrics}), flush=True)
    return result


def main() -> int:
    """Run the seeds and write benchmarks/results/fg_qa_feedback.json (after every seed)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["hybrid", "sequence"],
                        choices=["hybrid", "bce", "span_bt", "sequence", "human_pairs", "human_spans"],
                        help="hybrid / bce / span_bt / sequence learn from the edits; human_pairs (a sequence RM on "
                             "the human preference pairs) and human_spans (a token RM on the human error spans) are "
                             "upper references: each learns the very label its test reads")
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--prompt-chars", type=int, default=600, help="passage characters kept in each prompt")
    parser.add_argument("--test-share", type=float, default=0.25)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N questions (smoke runs)")
    parser.add_argument("--output", default="runs/bench-fg")
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "fg_qa_feedback.json"))
    args = parser.parse_args()
    fg_file = Path(args.data) / "edits" / "qa_feedback_finegrained.jsonl"
    pairs_file = Path(args.data) / "preferences" / "qa_feedback_pairs.jsonl"
    if not fg_file.exists() or not pairs_file.exists():
        print(f"skipped: {fg_file} or {pairs_file} not found")
        return 0
    rows = [json.loads(line) for line in fg_file.read_text().splitlines() if line.strip()][: args.limit]
    human_pairs = [json.loads(line) for line in pairs_file.read_text().splitlines() if line.strip()]
    started = time.perf_counter()
    per_seed = {}
    for seed in args.seeds:
        per_seed[seed] = run_seed(args, seed, rows, human_pairs)
        _write(args, per_seed, started)
    return 0


def _write(args: argparse.Namespace, per_seed: dict, started: float) -> None:
    """Write the seeds finished so far with means, stds and paired differences."""
    seeds = list(per_seed)
    aggregate: dict = {}
    for variant in args.variants:
        keys = per_seed[seeds[0]]["variants"][variant].keys()
        aggregate[variant] = {}
        for key in keys:
            vals = [per_seed[s]["variants"][variant][key] for s in seeds]
            if all(isinstance(v, (int, float)) for v in vals):
                aggregate[variant][key] = {"mean": round(statistics.mean(vals), 4),
                                           "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0}
    result = {"what": "FG token RM (from human minimal edits) vs sequence RM on the same pairs, QA-Feedback dev",
              "args": {k: v for k, v in vars(args).items() if k not in ("results",)}, "seeds": seeds,
              "wall_minutes": round((time.perf_counter() - started) / 60, 1), "aggregate": aggregate,
              "per_seed": per_seed}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(aggregate, indent=1))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    sys.exit(main())
