"""`tokencredit judge` (label a dataset with an LLM judge) and `tokencredit evaluate` (judged win rate).

``judge`` writes the record formats the reward models read:

- ``task=pairwise``: ``{prompt, a, b}`` in -> ``{prompt, chosen, rejected, p_chosen}`` pairs out (ties and
  unreadable answers are left out and counted);
- ``task=rubric``: ``{prompt, response}`` in -> ``{prompt, response, score}`` (1-5);
- ``task=spans``: ``{prompt, response}`` in -> ``{prompt, response, spans: [{start, end, label}]}`` token labels;
- ``task=edits``: ``{prompt, response}`` in -> ``{prompt, original, edited}`` minimal edits (FG).

Every judge answer is stored in a SQLite cache (``cache``, default next to the output) as it arrives; a rerun
after a crash or a kill asks only for what is missing, and the output file is written whole at the end, so it
never holds a partial or duplicated label. ``<output>.summary.json`` counts labels, ties and unreadable answers,
and lists the input records that failed (the server refused their request) by index, line and ``id`` field.
An empty input is an error, and so is a job in which no record got a label or a tie (every record failed or
had unreadable answers): the summary is written with the reason and the labels file is not. ``reask_unreadable=true``
asks again for cached answers that could not be read. See docs/judge.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokencredit.config import ConfigError
from tokencredit.judges.backends import (
    JudgeError,
)
from tokencredit.judges.judge_labelers import EditLabeler, LabelStats, PairwiseLabeler, RubricLabeler, SpanLabeler
from tokencredit.judges.settings import JudgeSettings, make_backend, win_rate
from tokencredit.judges.templates import load_template
from tokencredit.record_files import RecordError, load_prompts, read_jsonl
from tokencredit.runs import atomic_write_json, atomic_write_text


@dataclass
class JudgeRunConfig(JudgeSettings):
    """Settings of `tokencredit judge`."""

    # what to label: pairwise (preference pairs), rubric (1-5 scores), spans (token labels) or edits (minimal
    # edits, FG); docs/judge.md gives each one's input and output records
    task: Literal["pairwise", "rubric", "spans", "edits"] = "pairwise"
    data: str | None = None  # .jsonl input (fields below)
    output: str = "runs/judge/labels.jsonl"  # labelled .jsonl, written whole at the end; tallies: <output>.summary.json
    cache: str | None = None  # default: <output>.cache.sqlite
    prompt_field: str = "prompt"  # input field holding the prompt
    response_field: str = "response"  # rubric / spans / edits
    a_field: str = "a"  # pairwise
    b_field: str = "b"  # pairwise


def _field(obj: dict, name: str, where: str) -> str:
    """A string field of an input record, or a ConfigError naming the line."""
    value = obj.get(name)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: field {name!r} must be a string (got {type(value).__name__})")
    return value


def run_judge(cfg: JudgeRunConfig) -> dict:
    """Label cfg.data with the judge; returns the summary (also written next to the output)."""
    if cfg.data is None:
        raise ConfigError("judge needs data=FILE.jsonl")
    template = load_template(cfg.task, cfg.template)
    lines = list(read_jsonl(cfg.data))
    if not lines:
        raise RecordError(f"{cfg.data}: empty input: no records to judge")
    rows = [(f"{cfg.data}:{n}", o) for n, o in lines]
    out = Path(cfg.output)
    backend = make_backend(cfg, cfg.cache or str(out) + ".cache.sqlite")
    records: list[dict] = []
    if cfg.task == "pairwise":
        items = [(_field(o, cfg.prompt_field, w), _field(o, cfg.a_field, w), _field(o, cfg.b_field, w))
                 for w, o in rows]
        verdicts, stats = PairwiseLabeler(backend, template, cfg.use_logprobs, cfg.reask_unreadable).label(items)
        for (prompt, a, b), v in zip(items, verdicts):
            if v.verdict in ("a", "b"):
                chosen, rejected = (a, b) if v.verdict == "a" else (b, a)
                p = v.p_a if v.verdict == "a" else 1 - v.p_a
                records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "p_chosen": p})
    else:
        items = [(_field(o, cfg.prompt_field, w), _field(o, cfg.response_field, w)) for w, o in rows]
        labeler = {"rubric": RubricLabeler, "spans": SpanLabeler, "edits": EditLabeler}[cfg.task](
            backend, template, reask_unreadable=cfg.reask_unreadable)
        labels, stats = labeler.label(items)
        for (prompt, response), label in zip(items, labels):
            if label is None:
                continue
            if cfg.task == "rubric":
                records.append({"prompt": prompt, "response": response, "score": label})
            elif cfg.task == "spans":
                records.append({"prompt": prompt, "response": response,
                                "spans": [{"start": s.start, "end": s.end, "label": s.label} for s in label]})
            else:
                records.append({"prompt": prompt, "original": response, "edited": label})
    failed = [{"index": k, "line": lines[k][0], **({"id": lines[k][1]["id"]} if "id" in lines[k][1] else {}),
               "error": reason} for k, reason in stats.failures]
    summary = {"task": cfg.task, "output": str(out), "records": len(records), **_stats(stats),
               "failed_records": failed, "answers_from_cache": backend.stats.cached,
               "answers_asked": backend.stats.asked, "answers_reasked": backend.stats.reasked,
               "retries": backend.stats.retries, "cache_rows_discarded": backend.stats.discarded}
    error = _no_label_error(cfg.data, stats, failed)
    if error is not None:
        # Like evaluate with no verdict: the summary says why, and no empty labels file passes for a result.
        atomic_write_json(Path(str(out) + ".summary.json"), {**summary, "error": error})
        raise JudgeError(error)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_json(Path(str(out) + ".summary.json"), summary)
    return summary


def _no_label_error(data: str, stats: LabelStats, failed: list[dict]) -> str | None:
    """Why a job gave no record a verdict (a label or a tie), or None when at least one got one."""
    if stats.labelled + stats.ties > 0:
        return None
    if len(failed) == stats.total:
        return (f"every one of the {stats.total} record(s) of {data} failed, e.g. record {failed[0]['index']} "
                f"(line {failed[0]['line']}): {failed[0]['error']}")
    unreadable = stats.total - len(failed)
    error = (f"none of the {stats.total} record(s) of {data} got a label: {unreadable} had unreadable judge "
             f"answers ({stats.unparseable} unreadable answer(s)) and {len(failed)} failed; no labels written")
    if stats.examples:
        error += f" (e.g. {stats.examples[0][:200]!r})"
    elif failed:
        error += f" (e.g. record {failed[0]['index']}: {failed[0]['error'][:200]})"
    return error + ("; if the judge has been fixed since, reask_unreadable=true asks again for cached answers "
                    "it could not read")


def _stats(stats: LabelStats) -> dict:
    """LabelStats as a dict (failures are named by the caller, which knows the records)."""
    return {"total": stats.total, "labelled": stats.labelled, "ties": stats.ties,
            "unparseable": stats.unparseable, "unparseable_examples": stats.examples, "failed": stats.failed}


# ---------------------------------------------------------------------- evaluate: judged win rate
@dataclass
class EvaluateConfig(JudgeSettings):
    """Settings of `tokencredit evaluate`: side a against side b on a prompt set."""

    prompts: str | None = None  # .jsonl of {prompt, reference?} (e.g. instructions with reference outputs)
    a: str | None = None  # a policy (built-in name or folder) or a .jsonl of {prompt, response} generations
    b: str = "reference"  # the same, or "reference" for the prompts' reference field
    output_dir: str = "runs/evaluate"  # evaluate.json, verdicts.jsonl and a policy side's generations_<side>.jsonl
    cache: str | None = None  # default: output_dir/judge_cache.sqlite
    prompt_field: str = "prompt"  # prompts field holding the prompt
    reference_field: str = "reference"  # prompts field holding the reference response (b=reference, metrics)
    max_prompts: int | None = None  # use only the first N prompts; None = all
    max_new_tokens: int = 256  # policies: longest greedy answer, in tokens
    chat: bool = True  # policies: render prompts with the chat template
    gen_batch_size: int = 8  # policies: prompts per generation batch
    seed: int = 0  # seeds the bootstrap of the win rate's 95% interval


def _side(cfg: EvaluateConfig, spec: str, prompts: list[str], refs: list[str | None], name: str) -> list[str]:
    """Responses of one side: references, saved generations, or a policy's greedy answers (saved to output_dir)."""
    if spec == "reference":
        if any(r is None for r in refs):
            raise ConfigError(f"{name}=reference but some prompts have no {cfg.reference_field!r} field")
        return list(refs)
    path = Path(spec)
    if path.is_file():
        saved = {}
        for n, obj in read_jsonl(path):
            saved[_field(obj, "prompt", f"{path}:{n}")] = _field(obj, "response", f"{path}:{n}")
        missing = [p for p in prompts if p not in saved]
        if missing:
            raise ConfigError(f"{spec} has no response for {len(missing)} prompt(s), e.g. {missing[0][:80]!r}")
        return [saved[p] for p in prompts]
    import torch

    from tokencredit.generation import generate
    from tokencredit.models import apply_chat, load_trained_policy, resolve_device

    model, tokenizer = load_trained_policy(spec, device=resolve_device(cfg.device))
    inputs = apply_chat(tokenizer, prompts) if cfg.chat and getattr(tokenizer, "chat_template", None) else prompts
    texts: list[str] = []
    for start in range(0, len(inputs), cfg.gen_batch_size):
        with torch.no_grad():
            texts += generate(model, tokenizer, inputs[start : start + cfg.gen_batch_size], greedy=True,
                              max_new_tokens=cfg.max_new_tokens).texts
    texts = [t.strip() for t in texts]
    out = Path(cfg.output_dir) / f"generations_{name}.jsonl"
    atomic_write_text(out, "".join(json.dumps({"prompt": p, "response": t}) + "\n" for p, t in zip(prompts, texts)))
    return texts


def run_evaluate(cfg: EvaluateConfig) -> dict:
    """Judge side a against side b on every prompt (both orders) and report the win rate and task metrics."""
    if cfg.prompts is None or cfg.a is None:
        raise ConfigError("evaluate needs prompts=FILE.jsonl and a=POLICY_OR_GENERATIONS (b defaults to reference)")
    prompts, refs = load_prompts(cfg.prompts, cfg.prompt_field, cfg.reference_field)
    prompts, refs = prompts[: cfg.max_prompts], refs[: cfg.max_prompts]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    side_a = _side(cfg, cfg.a, prompts, refs, "a")
    side_b = _side(cfg, cfg.b, prompts, refs, "b")
    backend = make_backend(cfg, cfg.cache or str(out / "judge_cache.sqlite"))
    labeler = PairwiseLabeler(backend, load_template("pairwise", cfg.template), cfg.use_logprobs,
                              cfg.reask_unreadable)
    verdicts, stats = labeler.label(list(zip(prompts, side_a, side_b)))
    atomic_write_text(out / "verdicts.jsonl", "".join(
        json.dumps({"prompt": p, "a": a, "b": b, "verdict": v.verdict, "p_a": v.p_a,
                    **({"error": v.error} if v.error else {})}) + "\n"
        for p, a, b, v in zip(prompts, side_a, side_b, verdicts)))
    rate = win_rate([v.verdict for v in verdicts], seed=cfg.seed)
    result = {"a": cfg.a, "b": cfg.b, "prompts": len(prompts), **rate,
              "unjudged": sum(v.verdict is None for v in verdicts),
              "failed_prompts": [{"index": k, "error": reason} for k, reason in stats.failures],
              "judge": {"backend": cfg.backend, "model": cfg.model, **_stats(stats),
                        "cache_rows_discarded": backend.stats.discarded},
              "mean_length_words": {"a": _mean_words(side_a), "b": _mean_words(side_b)}}
    if rate["judged"] == 0:
        # A win rate from no verdicts would read as a real 0.5 (or whatever a default gives); say why instead.
        error = (f"no readable verdict for any of the {len(prompts)} prompt(s): {stats.unparseable} judge "
                 f"answer(s) unreadable, {stats.failed} prompt(s) failed; not reporting a win rate")
        example = stats.examples[0] if stats.examples else stats.failures[0][1] if stats.failures else None
        if example:
            error += f" (e.g. {example[:200]!r})"
        atomic_write_json(out / "evaluate.json", {**result, "error": error})
        raise JudgeError(error)
    if all(r is not None for r in refs):
        result["metrics_vs_reference"] = {"a": _text_metrics(side_a, refs), "b": _text_metrics(side_b, refs)}
    atomic_write_json(out / "evaluate.json", result)
    return result


def _mean_words(texts: Sequence[str]) -> float:
    """Mean length in words."""
    return sum(len(t.split()) for t in texts) / max(len(texts), 1)


def _text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU and mean ROUGE-L F of predictions against references, both in [0, 1]."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return {"bleu": sacrebleu.corpus_bleu(list(predictions), [list(references)]).score / 100,
            "rougeL": sum(rouge) / max(len(rouge), 1)}
