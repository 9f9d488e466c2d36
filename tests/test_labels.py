import pytest

from tokencredit.feedback import ReferenceLabeler, label_stats
from tokencredit.models import load_tokenizer
from tokencredit.rewards.labels import (
    SpanLabel,
    labels_for_token_ids,
    spans_to_token_labels,
    word_spans,
)
from tokencredit.testing import tiny_word_tokenizer
from tokencredit.token_text import token_char_spans, token_pieces


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer("smollm2-135m-instruct")


def span_on(text, word, label):
    start = text.index(word)
    return SpanLabel(start, start + len(word), label)


def test_word_spans():
    text = "  Python's e-mail, a/b - 3.11 x_y"
    assert word_spans(text) == [
        (2, 10, "Python's"),
        (11, 17, "e-mail"),
        (19, 22, "a/b"),
        (25, 26, "3"),
        (27, 29, "11"),
        (30, 31, "x"),
        (32, 33, "y"),
    ]
    assert word_spans("") == [] and word_spans(" - / ") == []


def test_span_label_is_validated():
    with pytest.raises(ValueError, match="start < end"):
        SpanLabel(3, 3, 1)
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        SpanLabel(0, 2, 0)


def test_spans_to_token_labels_on_smollm2_bpe(smol):
    text = " python sort list"
    ids, labels = spans_to_token_labels(text, [span_on(text, "sort", -1)], smol)
    assert ids == smol(text, add_special_tokens=False)["input_ids"] + [smol.eos_token_id]
    assert [smol.decode([i]) for i in ids[:-1]] == [" python", " sort", " list"]
    assert labels == [0, -1, 0, 0]
    ids, labels = spans_to_token_labels(text, [span_on(text, "sort", 1), span_on(text, "list", -1)], smol,
                                        add_eos=False)
    assert len(ids) == 3 and labels == [0, 1, -1]


def test_bad_wins_over_good_and_whitespace_tokens_stay_neutral(smol):
    text = "a  b\n\nc"
    everything = [SpanLabel(0, len(text), 1)]
    ids, labels = spans_to_token_labels(text, everything, smol, add_eos=False)
    pieces = [smol.decode([i]) for i in ids]
    assert [lab for p, lab in zip(pieces, labels) if p.strip()] == [1, 1, 1]
    assert [lab for p, lab in zip(pieces, labels) if not p.strip()] == [0] * sum(not p.strip() for p in pieces)
    _, labels = spans_to_token_labels(text, [*everything, SpanLabel(3, 4, -1)], smol, add_eos=False)
    assert labels[pieces.index(" b")] == -1


def test_labels_for_token_ids_on_smollm2_bpe(smol):
    text = " python sort list"
    ids = smol(text, add_special_tokens=False)["input_ids"] + [smol.eos_token_id]
    decoded, char_spans = token_char_spans(ids, smol)
    assert decoded == text and char_spans == [(0, 7), (7, 12), (12, 17), (17, 17)]
    assert labels_for_token_ids(ids, [span_on(text, "sort", -1)], smol) == [0, -1, 0, 0]
    assert labels_for_token_ids(ids, [span_on(text, "python", 1)], smol) == [1, 0, 0, 0]


def test_both_projections_agree_on_multibyte_characters(smol):
    # Characters split over several byte-level tokens: every token holding bytes of the word gets its label.
    text = "naïve café 😀 日本語 ok"
    ids = smol(text, add_special_tokens=False)["input_ids"] + [smol.eos_token_id]
    for start, end, word in word_spans(text):
        spans = [SpanLabel(start, end, -1)]
        from_text = spans_to_token_labels(text, spans, smol)[1]
        assert labels_for_token_ids(ids, spans, smol) == from_text, word
        assert -1 in from_text


def test_token_pieces_join_to_the_text_one_piece_per_token(smol):
    text = "naïve café 😀 日本語 ok"
    ids = smol(text, add_special_tokens=False)["input_ids"] + [smol.eos_token_id]
    pieces = token_pieces(smol, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text + smol.eos_token
    assert pieces[-1] == smol.eos_token and pieces[-2] == " ok"
    # A character split over byte tokens goes whole to the token that completes it; the others show nothing.
    assert "😀" in "".join(pieces) and all("\ufffd" not in p for p in pieces)
    assert "".join(token_pieces(smol, ids, skip_special_tokens=True)) == text


def test_word_tokenizer_projections():
    tok = tiny_word_tokenizer("python sort list x y".split())
    text = "python sort, list zz"
    ids, labels = spans_to_token_labels(text, [span_on(text, "sort", -1), span_on(text, "list", 1)], tok)
    # "," and "zz" are unknown words (<unk>), EOS is appended.
    assert tok.convert_ids_to_tokens(ids) == ["python", "sort", "<unk>", "list", "<unk>", "<eos>"]
    assert labels == [0, -1, 0, 1, 0, 0]

    sampled = tok.convert_tokens_to_ids(["python", "sort", "list", "<eos>"])
    decoded = tok.decode(sampled, skip_special_tokens=True)  # the word tokenizer joins words with spaces
    assert decoded == "python sort list"
    assert labels_for_token_ids(sampled, [span_on(decoded, "list", -1)], tok) == [0, 0, -1, 0]
    assert labels_for_token_ids(sampled, [SpanLabel(0, len(decoded), 1)], tok) == [1, 1, 1, 0]


def contexts(target, clicked=(), queries=()):
    return {"target": target, "clicked": list(clicked), "queries": list(queries)}


def labelled_words(text, spans):
    return {text[s.start : s.end]: s.label for s in spans}


def test_reference_labeler_hand_cases():
    query = "Python: sort the LIST by key, quickly!"
    ctx = contexts("python list sort", clicked=["How to sort by a key in Python"])
    [spans] = ReferenceLabeler().label(["history"], [query], [ctx])
    assert labelled_words(query, spans) == {"Python": 1, "sort": 1, "LIST": 1, "key": 1, "quickly": -1}
    # "the" and "by" are stopwords and stay neutral; "key" occurs only in the clicked title.
    [spans] = ReferenceLabeler(use_clicked=False).label(["history"], [query], [ctx])
    assert labelled_words(query, spans) == {"Python": 1, "sort": 1, "LIST": 1, "key": -1, "quickly": -1}
    [spans] = ReferenceLabeler(stopwords_neutral=False).label(["history"], [query], [ctx])
    assert labelled_words(query, spans)["the"] == -1 and labelled_words(query, spans)["by"] == 1
    [spans] = ReferenceLabeler(min_len=4).label(["history"], [query], [ctx])
    assert "key" not in labelled_words(query, spans) and "sort" in labelled_words(query, spans)


def test_reference_labeler_strips_punctuation_and_checks_inputs():
    [spans] = ReferenceLabeler().label(["h"], ["e-mail python's"], [contexts("Email pythons")])
    assert [s.label for s in spans] == [1, 1]
    with pytest.raises(ValueError, match="target"):
        ReferenceLabeler().label(["h"], ["q"], [{"clicked": []}])
    with pytest.raises(ValueError, match="contexts"):
        ReferenceLabeler().label(["h"], ["q", "r"], [contexts("q")])
    with pytest.raises(ValueError, match="list of titles"):
        ReferenceLabeler().label(["h"], ["q"], [{"target": "q", "clicked": "a title"}])


def test_label_stats():
    labels = [[SpanLabel(0, 1, 1), SpanLabel(2, 3, -1)], [SpanLabel(0, 1, 1)], []]
    assert label_stats(labels) == {
        "responses": 3, "positive": 2, "negative": 1, "frac_responses_with_negative": pytest.approx(1 / 3)
    }
    assert label_stats([])["frac_responses_with_negative"] == 0.0
