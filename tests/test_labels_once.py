"""Labels that pay for content once (issue 29): repeats are bad, a word is one unit of credit, the end is labelled,
unfinished samples get no end token, pairs are ranked by the labels' sum, and unreadable judge answers label
nothing."""

import pytest

import tokencredit.rewards.token_rm_training as token_rm
from tokencredit.config import config_defaults
from tokencredit.feedback import ReferenceLabeler
from tokencredit.judges.backends import ChatResult, JudgeBackend
from tokencredit.judges.judge_labelers import JudgeTokenLabeler
from tokencredit.judges.templates import SPANS
from tokencredit.models import load_tokenizer
from tokencredit.recipes.tppo import DemoConfig
from tokencredit.recipes.tppo_labels import end_label, label_sum, pairs_from_labels, token_example
from tokencredit.rewards.labels import SpanLabel, spans_to_token_labels, word_spans
from tokencredit.rewards.records import TokenExample
from tokencredit.rewards.token_rm import TokenRewardModel
from tokencredit.rewards.token_rm_training import TokenRMConfig, _token_rows, evaluate_token_reward_model
from tokencredit.run_folders import changed_settings
from tokencredit.testing import tiny_scalar_model


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smol_rm(smol):
    return TokenRewardModel.from_model(tiny_scalar_model(len(smol), seed=0), smol)


def labels_of(query, target, **kw):
    [spans] = ReferenceLabeler(**kw).label(["history"], [query], [{"target": target}])
    return [(query[s.start : s.end], s.label) for s in spans]


# ---------------------------------------------------------------------- repeated words
def test_a_repeated_supported_word_is_bad():
    query = "boston globe hospital Hospital, hospital"
    assert labels_of(query, "boston hospital") == [
        ("boston", 1), ("globe", -1), ("hospital", 1), ("Hospital", -1), ("hospital", -1)]
    # The old behaviour stays available: every occurrence on its own.
    assert labels_of(query, "boston hospital", repeats="keep") == [
        ("boston", 1), ("globe", -1), ("hospital", 1), ("Hospital", 1), ("hospital", 1)]


def test_a_repeated_stopword_stays_unlabelled_unless_stopwords_are_labelled():
    query = "history of the city of london"
    assert labels_of(query, "london history") == [("history", 1), ("city", -1), ("london", 1)]
    labelled = labels_of(query, "london history of", stopwords_neutral=False)
    assert [lab for word, lab in labelled if word == "of"] == [1, -1]
    with pytest.raises(ValueError, match="repeats"):
        ReferenceLabeler(repeats="clip")


# ---------------------------------------------------------------------- one unit of credit per word
def test_a_word_of_several_tokens_carries_one_label_on_its_first_token(smol):
    text = "boston hospitalization"
    spans = [SpanLabel(s, e, 1) for s, e, _ in word_spans(text)]
    ids, per_token = spans_to_token_labels(text, spans, smol, add_eos=False)
    pieces = [smol.decode([i]) for i in ids]
    assert pieces[:2] == ["b", "oston"]  # "boston" at the start of a text is two SmolLM2 tokens
    assert per_token == [1] * len(ids)  # unit="token" (the default): every token of a word pays
    _, per_word = spans_to_token_labels(text, spans, smol, add_eos=False, unit="word")
    assert per_word == [1, 0, 1]
    # A span over a phrase gives each of its words one unit; -1 wins on a token where two units start.
    _, phrase = spans_to_token_labels(text, [SpanLabel(0, len(text), -1)], smol, add_eos=False, unit="word")
    assert phrase == [-1, 0, -1]
    with pytest.raises(ValueError, match="unit"):
        spans_to_token_labels(text, spans, smol, unit="char")


# ---------------------------------------------------------------------- end labels and unfinished samples
def test_a_finished_sample_gets_its_end_label_on_eos_and_an_unfinished_one_no_eos(smol, smol_rm):
    text = "boston globe"
    spans = [SpanLabel(0, 6, 1), SpanLabel(7, 12, -1)]
    body = smol(text, add_special_tokens=False)["input_ids"]
    finished, unfinished, old = _token_rows(smol_rm, [
        TokenExample("p", text, spans, finished=True, end_label=1),
        TokenExample("p", text, spans, finished=False, end_label=-1),
        TokenExample("p", text, spans)], unit="word")
    assert finished.ids == body + [smol.eos_token_id] and finished.labels == [1, 0, -1, 1]
    assert unfinished.ids == body and unfinished.labels == [1, 0, -1]  # last token: -1 whatever its word label
    good_last = _token_rows(smol_rm, [TokenExample("p", "globe boston", [SpanLabel(6, 12, 1)], finished=False,
                                                   end_label=-1)], unit="word")[0]
    assert good_last.labels[-1] == -1 and smol.eos_token_id not in good_last.ids
    assert old.ids == finished.ids and old.labels == [1, 0, -1, 0]  # the defaults: EOS appended, unlabelled
    # Cut to fewer tokens than the response has, the kept last token is not where it ended: no end label.
    [cut] = _token_rows(smol_rm, [TokenExample("p", text, spans, finished=False, end_label=-1)], max_tokens=2,
                        unit="word")
    assert cut.labels == [1, 0]
    with pytest.raises(ValueError, match="end_label"):
        TokenExample("p", text, spans, end_label=2)


def test_the_end_label_rule():
    assert end_label("boston globe", [SpanLabel(0, 6, 1), SpanLabel(7, 12, -1)], finished=True) == 1
    assert end_label("globe", [SpanLabel(0, 5, -1)], finished=True) == -1  # nothing supported: do not end here
    assert end_label("", [], finished=True) == -1
    assert end_label("boston", [SpanLabel(0, 6, 1)], finished=False) == -1  # the length limit never pays
    # A supported word that a repeat rule overrides is not a supported word.
    assert end_label("boston", [SpanLabel(0, 6, 1), SpanLabel(0, 6, -1)], finished=True) == -1


def test_old_records_read_as_finished_with_an_unlabelled_end():
    old = {"session": 0, "prompt": "p", "response": "boston", "spans": [[0, 6, 1]]}
    new = {**old, "finished": False, "end_label": -1}
    assert (token_example(old, True).finished, token_example(old, True).end_label) == (True, 0)
    assert (token_example(new, True).finished, token_example(new, True).end_label) == (False, -1)
    assert (token_example(new, False).finished, token_example(new, False).end_label) == (True, 0)


def test_the_label_unit_reaches_training_and_evaluation(smol_rm, tmp_path, monkeypatch):
    text = "boston hospitalization"
    examples = [TokenExample("p", text, [SpanLabel(s, e, 1) for s, e, _ in word_spans(text)])]
    assert evaluate_token_reward_model(smol_rm, examples)["labelled_tokens"] == 3
    assert evaluate_token_reward_model(smol_rm, examples, label_unit="word")["labelled_tokens"] == 2
    units = []
    real = token_rm._token_rows
    monkeypatch.setattr(token_rm, "_token_rows", lambda *a, **kw: units.append(a[3] if len(a) > 3 else
                                                                                kw.get("unit")) or real(*a, **kw))
    token_rm.train_token_reward_model(
        smol_rm, TokenRMConfig(output_dir=str(tmp_path / "rm"), num_epochs=1, progress=False, eval_fraction=0.0,
                               label_unit="word"), token_examples=examples * 2)
    assert units == ["word"]
    with pytest.raises(ValueError, match="label_unit"):
        TokenRMConfig(label_unit="char").validate()


# ---------------------------------------------------------------------- pairs
def record(session, response, spans, finished=True):
    return {"session": session, "prompt": f"p{session}", "response": response, "spans": spans,
            "finished": finished, "end_label": end_label(response, [SpanLabel(*s) for s in spans], finished)}


def test_pairs_are_ranked_by_the_label_sum_and_unfinished_samples_form_none(smol):
    def score(r):
        return label_sum(token_example(r, True), smol, "word")

    # The share of good words ranks "boston" (1 of 1) above "boston hospital clinic globe" (3 of 4); the sum the
    # reward model's summed reward is fitted to (word units and end label) ranks them the other way.
    one = record(0, "boston", [[0, 6, 1]])
    two = record(0, "boston hospital clinic globe", [[0, 6, 1], [7, 15, 1], [16, 22, 1], [23, 28, -1]])
    assert score(one) == 1 + 1 and score(two) == 3 - 1 + 1
    [pair] = pairs_from_labels([one, two], "sum", score)
    assert (pair.chosen, pair.rejected) == (two["response"], "boston")
    [old] = pairs_from_labels([one, two], "share")
    assert (old.chosen, old.rejected) == ("boston", two["response"])
    # An unfinished sample is scored with an EOS appended if paired: it forms no pair.
    cut = record(0, "globe globe globe", [[0, 5, -1], [6, 11, -1], [12, 17, -1]], finished=False)
    assert [(p.chosen, p.rejected) for p in pairs_from_labels([one, two, cut], "sum", score)] == [
        (two["response"], "boston")]
    # Equal sums form no pair; different prompts are never paired.
    same = record(0, "hospital", [[0, 8, 1]])
    assert pairs_from_labels([one, same], "sum", score) == []
    assert pairs_from_labels([one, record(1, two["response"], two["spans"])], "sum", score) == []


# ---------------------------------------------------------------------- judge
class Stub(JudgeBackend):
    """A judge whose answer per response is given by the test."""

    def __init__(self, answers):
        super().__init__(None)
        self.answers = answers

    def identity(self):
        return {"kind": "stub"}

    def _ask(self, request):
        response = request.messages[-1]["content"].split("Answer:\n", 1)[1].split("\n\nCopy", 1)[0]
        return ChatResult(self.answers[response])


def test_an_unreadable_judge_answer_gives_no_labels():
    judge = JudgeTokenLabeler(Stub({"boston globe": "- globe", "cheap hotel": "I am not sure", "quiet": "none"}))
    labels = judge.label(["p"] * 3, ["boston globe", "cheap hotel", "quiet"], [{}] * 3)
    # None, not [], for the unreadable one: [] would pass for a query with nothing wrong in it.
    assert labels == [[SpanLabel(7, 12, -1)], None, []]
    assert judge.stats.unparseable == 1 and judge.stats.examples == ["I am not sure"]
    # A sample the judge could not label is no record, so it forms no pair.
    records = [record(0, r, [[s.start, s.end, s.label] for s in sp]) for r, sp in
               zip(["boston globe", "cheap hotel", "quiet"], labels) if sp is not None]
    pairs = pairs_from_labels(records, "sum", lambda r: sum(s[2] for s in r["spans"]))
    assert all("cheap hotel" not in (p.chosen, p.rejected) for p in pairs)


def test_the_judge_is_asked_about_repeats_and_the_demo_adds_the_repeat_rule():
    assert "repeats a word used earlier" in SPANS.user
    text = "cheap hotel hotel"
    answers = {text: "+ hotel"}
    assert JudgeTokenLabeler(Stub(answers)).label(["p"], [text], [{}]) == [[SpanLabel(6, 11, 1)]]
    assert JudgeTokenLabeler(Stub(answers), repeats="bad").label(["p"], [text], [{}]) == [
        [SpanLabel(6, 11, 1), SpanLabel(12, 17, -1)]]


# ---------------------------------------------------------------------- demo settings
def test_demo_defaults_are_the_new_rules_and_old_runs_resume_with_the_old_ones():
    cfg = DemoConfig()
    assert (cfg.label_repeats, cfg.label_unit, cfg.label_end, cfg.pair_rank) == ("bad", "word", True, "sum")
    old = config_defaults(DemoConfig)
    assert (old["label_repeats"], old["label_unit"], old["label_end"], old["pair_rank"]) == (
        "keep", "token", False, "share")
    saved = {k: v for k, v in old.items() if k not in ("label_repeats", "label_unit", "label_end", "pair_rank")}
    new = {**saved, "label_repeats": "bad", "label_unit": "word", "label_end": True, "pair_rank": "sum"}
    assert sorted(changed_settings(saved, new, defaults=old)) == [
        "label_end: None -> True", "label_repeats: None -> 'bad'", "label_unit: None -> 'word'",
        "pair_rank: None -> 'sum'"]
    assert changed_settings(saved, {**saved, "label_repeats": "keep", "label_unit": "token", "label_end": False,
                                    "pair_rank": "share"}, defaults=old) == []
    for bad in ({"label_unit": "char"}, {"label_repeats": "clip"}, {"pair_rank": "mean"}, {"label_end": "yes"}):
        with pytest.raises(ValueError, match="label_repeats"):
            DemoConfig(**bad).validate()


def test_demo_labels_only_next_query_words_when_clicked_titles_do_not_count(tmp_path):
    from tokencredit.recipes.tppo import DemoConfig
    from tokencredit.recipes.tppo_labels import make_labeler

    session = {"target": "boston globe", "clicked": ["Hospital rankings in Boston"]}
    spans = {}
    for clicked in (True, False):
        labeler = make_labeler(DemoConfig(fast=True, label_clicked=clicked), tmp_path)
        spans[clicked] = [s.label for s in labeler.label(["p"], ["boston hospital rankings"], [session])[0]]
    assert spans[True] == [1, 1, 1] and spans[False] == [1, -1, -1]
    with pytest.raises(ValueError, match="label_clicked applies to the reference labeler"):
        DemoConfig(fast=True, label_clicked=True, judge="http://127.0.0.1:9/v1").validate()
    DemoConfig(fast=True, judge="http://127.0.0.1:9/v1").validate()  # the default is unused with a judge


def test_label_stopwords_charges_the_stopwords_token_f1_counts(tmp_path):
    from tokencredit.recipes.tppo import DemoConfig
    from tokencredit.recipes.tppo_labels import make_labeler

    session = {"target": "history of boston", "clicked": []}
    response = "how to history of the boston of"
    words = {}
    for label_stopwords in (False, True):
        labeler = make_labeler(DemoConfig(fast=True, label_stopwords=label_stopwords), tmp_path)
        spans = labeler.label(["p"], [response], [session])[0]
        words[label_stopwords] = [(response[s.start:s.end], s.label) for s in spans]
    assert words[False] == [("history", 1), ("boston", 1)]  # the default leaves how/to/of/the unlabelled
    # labelled: a stopword of the next query pays once (its repeat is a miss), any other stopword is a miss
    assert words[True] == [("how", -1), ("to", -1), ("history", 1), ("of", 1), ("the", -1), ("boston", 1), ("of", -1)]
    with pytest.raises(ValueError, match="label_stopwords applies to the reference labeler"):
        DemoConfig(fast=True, label_stopwords=True, judge="http://127.0.0.1:9/v1").validate()
    with pytest.raises(ValueError, match="label_stopwords must be true or false"):
        DemoConfig(fast=True, label_stopwords="yes").validate()


# ---------------------------------------------------------------------- the price of a miss
def test_a_miss_weight_puts_the_rewards_zero_where_a_unit_is_right_that_often():
    import math

    import torch

    from tokencredit.rewards.token_rm_training import token_bce_loss

    # 3 good and 7 bad tokens behind one shared logit r: the weighted BCE is minimal at
    # r* = log(p / (w (1 - p))), i.e. r* > 0 exactly when p = 0.3 exceeds w / (1 + w).
    labels = torch.tensor([[1, 1, 1, -1, -1, -1, -1, -1, -1, -1]])
    mask = torch.ones_like(labels)
    for w in (1.0, 0.25, 0.5):
        r = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([r], max_iter=50)

        def closure(opt=opt, r=r, w=w):
            opt.zero_grad()
            loss = token_bce_loss(r.expand(1, 10), labels, mask, bad_weight=w)
            loss.backward()
            return loss

        opt.step(closure)
        assert r.item() == pytest.approx(math.log(0.3 / (w * 0.7)), abs=1e-3)
    # Small weights: a unit right 30% of the time earns; w = 1 (a miss as bad as a hit is good) makes it cost.
    assert math.log(0.3 / (0.25 * 0.7)) > 0 > math.log(0.3 / 0.7)
    with pytest.raises(ValueError, match="pass one"):
        token_bce_loss(torch.zeros(1, 10), labels, mask, balanced=True, bad_weight=0.5)
    with pytest.raises(ValueError, match="bad_weight"):
        TokenRMConfig(bad_weight=0.0).validate()
    with pytest.raises(ValueError, match="set one"):
        TokenRMConfig(bad_weight=0.5, balance_labels=True).validate()


def test_the_miss_cost_is_the_f1_break_even_of_the_labelled_samples():
    from tokencredit.recipes.tppo_labels import MIN_MISS_COST, miss_cost

    # The greedy queries' mean F1 is 0.2: a word pays when right more than 0.1 of the time (the samples' own F1,
    # lower at temperature 1, does not set it).
    records = [{"greedy_f1": 0.1, "f1": 0.0}, {"greedy_f1": 0.3, "f1": 0.0}]
    assert miss_cost(DemoConfig(), records) == pytest.approx(0.2 / 1.8)
    assert miss_cost(DemoConfig(), [{"greedy_f1": 0.0}]) == MIN_MISS_COST
    assert miss_cost(DemoConfig(label_miss_cost=0.5), records) == 0.5
    assert miss_cost(DemoConfig(label_miss_cost="balanced"), records) is None
    assert miss_cost(DemoConfig(judge="http://127.0.0.1:9/v1"), [{}]) == 1.0  # a judge sees no reference
    with pytest.raises(ValueError, match="label them again"):
        miss_cost(DemoConfig(), [{"greedy_f1": 0.2}, {"f1": 0.2}])
    for bad in (0.0, -1.0, "half"):
        with pytest.raises(ValueError, match="label_miss_cost"):
            DemoConfig(label_miss_cost=bad).validate()
    # Runs saved before the option resume with the labels as they were trained then.
    assert config_defaults(DemoConfig)["label_miss_cost"] == "balanced"


def test_cheap_misses_rank_pairs_only_where_the_hits_differ(smol):
    def score(cost):
        return lambda r: label_sum(token_example(r, True), smol, "word", cost)

    short = record(0, "globe", [[0, 5, -1]])
    long = record(0, "globe tavern harbor", [[0, 5, -1], [6, 12, -1], [13, 19, -1]])
    hit = record(0, "boston tavern", [[0, 6, 1], [7, 13, -1]])
    # At a miss cost of 1 the shorter of two samples without a hit wins: the pressure towards empty queries.
    assert score(1.0)(short) == -2 and score(1.0)(long) == -4
    assert ("globe", "globe tavern harbor") in [(p.chosen, p.rejected)
                                                for p in pairs_from_labels([short, long], "sum", score(1.0), 1.0)]
    # At 0.1 they differ by 0.2, less than a hit's worth: no pair; a sample with a hit still beats both.
    assert score(0.1)(long) == pytest.approx(-0.4) and score(0.1)(hit) == pytest.approx(1 - 0.1 + 1)
    pairs = pairs_from_labels([short, long, hit], "sum", score(0.1), 1.0)
    assert sorted((p.chosen, p.rejected) for p in pairs) == [("boston tavern", "globe"),
                                                             ("boston tavern", "globe tavern harbor")]
