"""PGG's tasks: few-shot prompted classification (files, margins, calibration) and summarisation (records, ROUGE)."""

import json
from pathlib import Path

import pytest
import torch

from tokencredit.tasks.fewshot import (
    FewShotDataError,
    LabelledText,
    PromptedClassifier,
    clean_prompt,
    load_fewshot_split,
    load_labelled_tsv,
)
from tokencredit.tasks.summarize import (
    Document,
    SummaryDataError,
    clean_summary,
    load_documents,
    rouge_l_score_fn,
    rouge_scores,
    summary_metrics,
    summary_prompt,
)
from tokencredit.testing import tiny_causal_lm, tiny_word_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_tsv_loader_reads_both_headers_and_names_bad_lines(tmp_path):
    good = tmp_path / "train.tsv"
    good.write_text("sentence\tlabel\na  fine   film\t1\n\nawful\t0\n")
    assert load_labelled_tsv(good) == [LabelledText("a fine film", 1), LabelledText("awful", 0)]
    (tmp_path / "t.tsv").write_text("text\tlabel\nnews\t3\n")
    assert load_labelled_tsv(tmp_path / "t.tsv")[0].label == 3
    cases = {"label\tx\n": ":1: the header", "sentence\tlabel\nok\tpos\n": ":2: label must be an integer",
             "sentence\tlabel\nok\t2\n": ":2: label 2 is outside", "sentence\tlabel\nonly\n": ":2: expected 2",
             "": "empty"}
    for i, (content, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.tsv"
        path.write_text(content)
        with pytest.raises(FewShotDataError, match=message):
            load_labelled_tsv(path, num_classes=2)
    with pytest.raises(FewShotDataError, match="no train.tsv"):
        load_fewshot_split(tmp_path / "nowhere")


def test_clean_prompt_keeps_the_first_line_and_a_few_words():
    assert clean_prompt("\n  It was really\nignored") == "It was really"
    assert clean_prompt("a b c d e", max_words=3) == "a b c"
    assert clean_prompt("   ") == ""


WORDS = "good bad film plot it was N/A".split()


def classifier(calibrate=True):
    tok = tiny_word_tokenizer(WORDS)
    model = tiny_causal_lm(len(tok), seed=0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return PromptedClassifier(model, tok, ["bad", "good"], calibrate=calibrate), tok


def test_margins_are_correct_minus_best_other_and_calibration_subtracts_the_content_free_prior():
    clf, _ = classifier(calibrate=False)
    examples = [LabelledText("film was", 1), LabelledText("plot was", 0), LabelledText("it", 1)]
    raw = clf.label_logprobs([e.text for e in examples], "it was")
    expected = torch.stack([raw[0, 1] - raw[0, 0], raw[1, 0] - raw[1, 1], raw[2, 1] - raw[2, 0]])
    assert torch.allclose(clf.margins(examples, "it was"), expected)
    assert clf.accuracy(examples, "it was") == pytest.approx(float((expected > 0).float().mean()))
    calibrated, _ = classifier(calibrate=True)
    prior = calibrated.label_logprobs(["N/A"], "it was")
    assert torch.allclose(calibrated.label_scores([e.text for e in examples], "it was"), raw - prior)
    score = calibrated.score_fn(examples)
    values = score(["x", "x"], ["it was\nmore", "it was"])
    assert values[0] == values[1] == pytest.approx(float(calibrated.margins(examples, "it was").mean()))


@pytest.mark.parametrize("max_rows", [1, 3, 512])
def test_shared_text_cache_gives_the_same_logprobs_as_whole_sequences(max_rows):
    # max_rows 1: one prompt per pass; 3: groups that split the prompts; 512: every prompt of a text batch at once
    # (tails of different lengths padded in the middle of the sequence).
    tok = tiny_word_tokenizer(WORDS)
    model = tiny_causal_lm(len(tok), seed=1, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    clf = PromptedClassifier(model, tok, ["bad", "good"], template="{text} {prompt}", mixed_precision="no",
                             batch_size=2, max_rows=max_rows)
    texts = ["film was good plot", "it", "bad bad film"]
    prompts = ["it was", "", "plot", "good film was it plot", "was"]
    many = clf.label_logprobs_many(texts, prompts)
    words = [tok.convert_tokens_to_ids(w) for w in ("bad", "good")]
    for j, prompt in enumerate(prompts):
        for i, text in enumerate(texts):
            ids = tok(text)["input_ids"] + (tok(" " + prompt, add_special_tokens=False)["input_ids"] if prompt else [])
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            expected = torch.log_softmax(logits, -1)[words]
            assert torch.allclose(many[j, i], expected, atol=1e-5), (prompt, text)
    assert clf.accuracy_many([LabelledText(t, 1) for t in texts], prompts) == [
        clf.accuracy([LabelledText(t, 1) for t in texts], p) for p in prompts]


def test_texts_are_run_once_across_calls_and_large_calls_are_not_kept():
    tok = tiny_word_tokenizer(WORDS)
    model = tiny_causal_lm(len(tok), seed=2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    clf = PromptedClassifier(model, tok, ["bad", "good"], mixed_precision="no", batch_size=8, keep_texts=3)
    widths = []
    model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].size(1)),
                                    with_kwargs=True)
    texts = ["film was good plot", "it", "bad bad film"]
    first = clf.label_logprobs_many(texts, ["it was", "plot"])
    text_passes = len(widths) - 1  # one text pass, one batched pass over both prompts
    assert text_passes == 1
    again = clf.label_logprobs_many(texts, ["plot", "it was"])
    assert len(widths) == 3  # only the prompts' pass: the texts' cache was kept and is not altered by use
    assert torch.equal(again, first.flip(0))
    clf.label_logprobs_many(texts + ["it"], ["plot"])  # more texts than keep_texts: run, not kept
    clf.label_logprobs_many(texts + ["it"], ["plot"])
    assert len(widths) == 7


def test_kept_text_caches_are_bounded_least_recently_used_first():
    tok = tiny_word_tokenizer(WORDS)
    model = tiny_causal_lm(len(tok), seed=2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    clf = PromptedClassifier(model, tok, ["bad", "good"], mixed_precision="no", batch_size=8, keep_texts=3)
    clf.KEEP_BATCHES = 2
    sets = [["it"], ["bad film"], ["good plot"]]
    clf.label_logprobs_many(sets[0], ["plot"])
    clf.label_logprobs_many(sets[1], ["plot"])
    clf.label_logprobs_many(sets[0], ["plot"])  # used again: now the most recent
    clf.label_logprobs_many(sets[2], ["plot"])  # a third set: the least recently used (sets[1]) goes
    assert len(clf._kept) == 2
    kept_texts = {heads[0][len(clf._before):] for heads in clf._kept}
    assert kept_texts == {"it", "good plot"}


def test_label_words_must_start_with_different_tokens():
    tok = tiny_word_tokenizer(WORDS)
    model = tiny_causal_lm(len(tok), seed=0)
    with pytest.raises(ValueError, match="different tokens"):
        PromptedClassifier(model, tok, ["good", "good"])
    with pytest.raises(ValueError, match="template"):
        PromptedClassifier(model, tok, ["good", "bad"], template="{text}")
    with pytest.raises(ValueError, match="then"):
        PromptedClassifier(model, tok, ["good", "bad"], template="{prompt} {text}")


@pytest.mark.skipif(not (SHARED / "fewshot" / "sst-2" / "16-42").exists(), reason="../shared/data absent")
def test_real_sst2_split_loads_with_its_sizes():
    split = load_fewshot_split(SHARED / "fewshot" / "sst-2" / "16-42")
    assert (len(split["train"]), len(split["dev"]), len(split["test"])) == (32, 32, 1821)
    assert {e.label for e in split["train"]} == {0, 1}


def test_documents_load_with_all_references_and_errors_name_the_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"document": "A long text.", "summary": "Short.", "references": ["Short.", "Brief."],
                                "id": 7}) + "\n")
    assert load_documents(path) == [Document("A long text.", ["Short.", "Brief."], "7")]
    path.write_text(json.dumps({"document": "x"}) + "\n" + json.dumps({"summary": "y"}) + "\n")
    with pytest.raises(SummaryDataError, match="docs.jsonl:2: 'document'"):
        load_documents(path)
    with pytest.raises(SummaryDataError, match="no documents"):
        load_documents([])


def test_prompt_cuts_the_document_and_rouge_takes_the_best_reference():
    prompt = summary_prompt(Document("one two three four five", ["x"]), max_words=3)
    assert "one two three" in prompt and "four" not in prompt and prompt.endswith("TL;DR:")
    assert clean_summary("A  summary.\nsame line\n\nnext paragraph") == "A summary. same line"
    best = rouge_scores("the cat sat", ["a dog ran", "the cat sat"])
    assert best["rougeL"] == pytest.approx(1.0) and rouge_scores("", ["x"])["rouge1"] == 0.0
    docs = [Document("d1", ["the cat sat"]), Document("d2", ["a dog ran far"])]
    metrics = summary_metrics(["the cat sat", "nothing alike"], docs)
    assert metrics["rougeL"] == pytest.approx(0.5) and metrics["mean_length"] == pytest.approx(2.5)
    score = rouge_l_score_fn(docs, ["p1", "p2"])
    assert score(["p2", "p1"], ["a dog ran far", "the cat"]) == pytest.approx([1.0, 0.8])
    with pytest.raises(ValueError, match="not one of this task's prompts"):
        score(["p3"], ["x"])


@pytest.mark.skipif(not (SHARED / "summarization" / "scitldr_dev.jsonl").exists(), reason="../shared/data absent")
def test_real_scitldr_loads():
    docs = load_documents(SHARED / "summarization" / "scitldr_dev.jsonl")
    assert len(docs) == 619 and all(d.references for d in docs)
