import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tokencredit.record_files import RecordError
from tokencredit.rewards.tokens import rewards_to_tensor
from tokencredit.tasks.imdb import (
    BagOfWordsScorer,
    Review,
    ReviewDataError,
    SentimentScorer,
    VaderScorer,
    bow_terms,
    clean_review,
    distinct_n,
    fluency,
    imdb_metrics,
    imdb_reward_fn,
    load_reviews,
    review_prompt,
    train_bow_scorer,
)
from tokencredit.testing import tiny_causal_lm, tiny_word_tokenizer

IMDB = Path("/work/shared/data/imdb")
GOOD = {"text": "A fine film.<br /><br />I liked it.", "label": 1, "rating": 8}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# -- records --------------------------------------------------------------------------------------------


def test_load_reviews_from_file_and_dicts(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [GOOD, {"text": "Dull.", "label": 0, "id": 7}])
    reviews = load_reviews(path)
    assert reviews == [Review(GOOD["text"], 1, 8), Review("Dull.", 0, None, "7")]
    assert load_reviews([GOOD]) == reviews[:1]
    assert issubclass(ReviewDataError, RecordError)


@pytest.mark.parametrize("bad, message", [
    ({"text": "ok", "label": 2}, "'label' must be 0"),
    ({"text": "ok", "label": True}, "'label' must be 0"),
    ({"label": 1}, "'text' must be a string"),
    ({"text": "<br />  ", "label": 1}, "'text' is empty"),
    ({"text": "ok", "label": 1, "rating": "ten"}, "'rating' must be an integer"),
])
def test_load_reviews_errors_name_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "r.jsonl", [GOOD, bad])
    with pytest.raises(ReviewDataError, match=rf"r\.jsonl:2: .*{message}"):
        load_reviews(path)
    with pytest.raises(ReviewDataError, match=rf"^record 1: .*{message}"):
        load_reviews([GOOD, bad])


def test_load_reviews_bad_json_and_empty(tmp_path):
    with pytest.raises(ReviewDataError, match=r"r\.jsonl:2: not valid JSON"):
        load_reviews(write_jsonl(tmp_path / "r.jsonl", [GOOD, "{oops"]))
    with pytest.raises(ReviewDataError, match="no reviews"):
        load_reviews(write_jsonl(tmp_path / "e.jsonl", []))
    with pytest.raises(ReviewDataError, match="no such file"):
        load_reviews(tmp_path / "missing.jsonl")


# -- prompts --------------------------------------------------------------------------------------------


def test_review_prompt_strips_html_and_takes_first_words():
    review = Review("Great  film.<br /><br />The <i>cast</i> was &amp; is superb, truly.", 1)
    assert clean_review(review.text) == "Great film. The cast was & is superb, truly."
    assert review_prompt(review, words=4) == "Great film. The cast"
    assert review_prompt(review.text, words=100) == clean_review(review.text)
    with pytest.raises(ValueError, match="at least 1"):
        review_prompt(review, words=0)


# -- scorers --------------------------------------------------------------------------------------------


def test_vader_prefers_obviously_positive_text():
    vader = VaderScorer()
    assert isinstance(vader, SentimentScorer)
    pos, neg, neutral = vader.prob_positive(["A wonderful, moving film. I loved every minute!",
                                             "Awful, boring and stupid. I hated it.", ""])
    assert pos > 0.8 and neg < 0.2 and neutral == 0.5
    with pytest.raises(ValueError, match="list of strings"):
        vader.prob_positive("a single string")


def toy_sentiment(n, seed):
    """Separable toy reviews: positives hold a 'good' word, negatives a 'bad' one, among shared filler."""
    rng = random.Random(seed)
    good, bad = ["great", "superb", "lovely"], ["awful", "dull", "terrible"]
    filler = "the movie plot actor scene".split()
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = rng.sample(filler, 3) + [rng.choice(good if label else bad)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def test_bag_of_words_learns_separable_toy_set_and_round_trips(tmp_path):
    texts, labels = toy_sentiment(60, seed=0)
    scorer = BagOfWordsScorer(ngrams=1).fit(texts, labels, min_df=1, steps=200, lr=0.1)
    assert isinstance(scorer, SentimentScorer)
    assert scorer.accuracy(texts, labels) == 1.0
    held_texts, held_labels = toy_sentiment(20, seed=1)
    assert scorer.accuracy(held_texts, held_labels) == 1.0
    assert scorer.weights[scorer.index["great"]] > 0 > scorer.weights[scorer.index["awful"]]

    path = scorer.save(tmp_path / "bow" / "scorer.json")
    saved = json.loads(path.read_text())
    assert saved["format"] == "tokencredit.bow_sentiment" and saved["ngrams"] == 1
    loaded = BagOfWordsScorer.load(path)
    assert loaded.vocabulary == scorer.vocabulary
    np.testing.assert_array_equal(loaded.predict_proba(held_texts), scorer.predict_proba(held_texts))
    # A text of unknown words falls back to the bias alone.
    assert loaded.prob_positive(["zzz qqq"])[0] == pytest.approx(1 / (1 + math.exp(-loaded.bias)))


def test_bag_of_words_rejects_bad_files_and_inputs(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "tokencredit.bow_sentiment", "version": 1, "ngrams": 1, "bias": 0.0,
                               "vocabulary": ["a", "b"], "weights": [1.0]}))
    with pytest.raises(ValueError, match=r"bad\.json: 1 weights for 2 vocabulary terms"):
        BagOfWordsScorer.load(bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"weights": []}))
    with pytest.raises(ValueError, match="not a saved bag-of-words scorer"):
        BagOfWordsScorer.load(other)
    with pytest.raises(ValueError, match="both classes"):
        BagOfWordsScorer().fit(["a", "b"], [1, 1])
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        BagOfWordsScorer().fit(["a", "b"], [1])


def test_bow_terms_include_bigrams_and_negations():
    assert bow_terms("Didn't like it.<br />", ngrams=2) == ["didn't", "like", "it", "didn't like", "like it"]


# -- reward contract --------------------------------------------------------------------------------------


def test_reward_fn_follows_the_contract():
    fn = imdb_reward_fn()
    prompts = ["This movie was", "I expected"]
    responses = ["wonderful and moving, I loved it.", "nothing and got a boring, awful mess."]
    rewards = fn(prompts, responses, [[5, 6, 7], [8, 9]])
    assert len(rewards) == 2 and all(isinstance(r, float) and 0.0 <= r <= 1.0 for r in rewards)
    assert rewards[0] > 0.5 > rewards[1]
    tensor = rewards_to_tensor(rewards, [3, 2])
    assert tensor[0, 2] == pytest.approx(rewards[0]) and tensor[1, 1] == pytest.approx(rewards[1])
    with pytest.raises(ValueError, match="one of each per row"):
        fn(prompts, responses[:1], [[1]])


def test_reward_fn_can_score_prompt_with_response():
    class Echo:
        def prob_positive(self, texts):
            return [len(t) / 100 for t in texts]

    assert imdb_reward_fn(Echo())(["abc"], ["de"], [[1]]) == [0.02]
    assert imdb_reward_fn(Echo(), include_prompt=True)(["abc"], ["de"], [[1]]) == [0.06]


# -- metrics --------------------------------------------------------------------------------------------


def test_distinct_n_hand_checked():
    assert distinct_n(["a b a", "b a"], 1) == pytest.approx(2 / 5)
    assert distinct_n(["a b a", "b a"], 2) == pytest.approx(2 / 3)  # ab, ba, ba
    assert distinct_n(["a"], 2) == 0.0


def test_fluency_matches_a_direct_computation():
    words = "the movie was good bad very".split()
    tok = tiny_word_tokenizer(words)
    model = tiny_causal_lm(len(tok), seed=3)
    prompts, continuations = ["the movie", "the movie was"], ["was very good", "bad"]
    out = fluency(model, tok, prompts, continuations, batch_size=1)
    # Direct: score each continuation token given everything before it, one row at a time.
    total, count = 0.0, 0
    for p, c in zip(prompts, continuations):
        p_ids, c_ids = tok(p)["input_ids"], tok(c, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        for t in range(len(p_ids), len(p_ids) + len(c_ids)):
            total -= float(logp[t - 1, ids[0, t]])
            count += 1
    assert out["nll"] == pytest.approx(total / count, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # Batching with padding must not change the number.
    assert fluency(model, tok, prompts, continuations, batch_size=2)["nll"] == pytest.approx(out["nll"], rel=1e-5)
    with pytest.raises(ValueError, match="no continuation tokens"):
        fluency(model, tok, ["the"], [""])


def test_imdb_metrics_keys_and_ranges():
    words = "the movie was good bad very".split()
    tok = tiny_word_tokenizer(words)
    model = tiny_causal_lm(len(tok), seed=0)
    texts, labels = toy_sentiment(40, seed=0)
    bow = BagOfWordsScorer(ngrams=1).fit(texts, labels, min_df=1)
    out = imdb_metrics(["the movie", "the movie"], ["was very good", "was bad"], VaderScorer(), bow, model, tok)
    assert set(out) == {"reward_p_pos", "heldout_p_pos", "nll", "perplexity", "mean_length", "distinct_1",
                        "distinct_2"}
    assert 0 <= out["reward_p_pos"] <= 1 and 0 <= out["heldout_p_pos"] <= 1
    assert out["mean_length"] == 2.5 and out["distinct_1"] == pytest.approx(4 / 5)
    assert set(imdb_metrics(["p"], ["a b"])) == {"mean_length", "distinct_1", "distinct_2"}


# -- real data --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (IMDB / "train.jsonl").is_file(), reason="shared IMDB data not present")
def test_bag_of_words_on_real_imdb_beats_chance():
    train = load_reviews(IMDB / "train.jsonl")[:2000]
    test = load_reviews(IMDB / "test.jsonl")[:500]
    assert {r.label for r in train} == {0, 1}
    assert "<br" not in review_prompt(next(r for r in train if "<br" in r.text), words=1000)
    scorer = train_bow_scorer(train)
    accuracy = scorer.accuracy([r.text for r in test], [r.label for r in test])
    print(f"bag-of-words accuracy on 500 IMDB test reviews: {accuracy:.3f}")
    assert accuracy > 0.7
