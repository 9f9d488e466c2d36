import json
import logging
import random

import numpy as np
import pytest

from tokencredit.record_files import RecordError
from tokencredit.rewards.data import (
    EditTriple,
    RankedList,
    RewardDataError,
    UnlabelledPair,
    load_edits,
    load_pairs,
    load_ranked,
    load_unlabelled_pairs,
    split_records,
)
from tokencredit.rewards.records import PreferencePair
from tokencredit.rewards.records import random_split as _split


def write_jsonl(path, rows):
    """Rows as JSONL; a str row is written as the raw line (for broken JSON and blank lines)."""
    lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def error_of(loader, source, **kwargs):
    with pytest.raises(RewardDataError) as info:
        loader(source, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------- preference pairs
PAIRS = [
    {"prompt": "2+2?", "chosen": "4", "rejected": "5", "extra": 1},
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
]


def test_load_pairs_from_jsonl_and_from_dicts(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], "", PAIRS[1]])
    expected = [PreferencePair("2+2?", "4", "5"), PreferencePair("Capital of France?", "Paris.", "Lyon.")]
    assert load_pairs(path) == expected
    assert load_pairs(str(path)) == expected
    assert load_pairs(PAIRS) == expected
    assert load_pairs(iter(PAIRS)) == expected  # any iterable of dicts


def test_load_pairs_with_other_field_names_and_no_prompt():
    rows = [{"question": "q", "good": " yes", "bad": " no"}]
    assert load_pairs(rows, prompt_field="question", chosen_field="good", rejected_field="bad") == [
        PreferencePair("q", " yes", " no")  # response text is kept as given: a leading space tokenizes differently
    ]
    hh = [{"chosen": "Human: hi Assistant: hello", "rejected": "Human: hi Assistant: go away"}]
    assert load_pairs(hh, prompt_field=None)[0].prompt == ""


def test_load_pairs_errors_name_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [PAIRS[0], PAIRS[1], {"prompt": "p", "chosen": "a"}])
    msg = error_of(load_pairs, path)
    assert msg.startswith(f"{path}:3: field 'rejected' is missing") and "'prompt', 'chosen'" in msg
    path = write_jsonl(tmp_path / "p.jsonl", [PAIRS[0], {"prompt": "p", "chosen": 4, "rejected": "b"}])
    assert error_of(load_pairs, path) == f"{path}:2: field 'chosen' must be a string, got int"
    # An empty reply is data (a chosen or rejected answer that says nothing), not an error.
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "  \n"}])
    assert load_pairs(path) == [PreferencePair("p", "a", "  \n")]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "", "chosen": "a", "rejected": "b"}])
    assert error_of(load_pairs, path) == f"{path}:1: field 'prompt' is empty"
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": "a", "rejected": "b"}])
    assert "prompt_field=None" in error_of(load_pairs, path)
    chat = [{"role": "user", "content": "hi"}]
    path = write_jsonl(tmp_path / "p.jsonl", [PAIRS[0], {"prompt": "p", "chosen": chat, "rejected": "b"}])
    msg = error_of(load_pairs, path)
    assert msg.startswith(f"{path}:2: field 'chosen' must be a string, got list") and "apply_chat_template" in msg


def test_load_pairs_file_level_errors(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [PAIRS[0], "{not json"])
    assert error_of(load_pairs, path).startswith(f"{path}:2: not valid JSON")
    path = write_jsonl(tmp_path / "p.jsonl", [PAIRS[0], "[1, 2]"])
    assert error_of(load_pairs, path) == f"{path}:2: expected a JSON object, got list"
    assert error_of(load_pairs, tmp_path / "missing.jsonl") == f"{tmp_path / 'missing.jsonl'}: no such file"
    path = write_jsonl(tmp_path / "empty.jsonl", [""])
    assert error_of(load_pairs, path) == f"{path}: no records found"
    assert issubclass(RewardDataError, RecordError)


def test_in_memory_errors_name_the_row():
    assert error_of(load_pairs, [PAIRS[0], {"prompt": "p", "chosen": "a", "rejected": None}]).startswith(
        "row 1: field 'rejected' is missing or null"
    )
    assert error_of(load_pairs, [PAIRS[0], "a string"]) == (
        "row 1: expected a record (an object with fields), got str"
    )
    assert error_of(load_pairs, []) == "the given records: no records found"


def test_bad_sources_are_type_errors():
    with pytest.raises(TypeError, match="a .jsonl path, a list of dicts or a datasets.Dataset, got dict"):
        load_pairs(PAIRS[0])
    with pytest.raises(TypeError, match="got int"):
        load_pairs(3)

    class DatasetDict(dict):
        """Stands in for datasets.DatasetDict, which iterates over split names."""

    with pytest.raises(TypeError, match=r"splits 'train'.*dataset\['train'\]"):
        load_pairs(DatasetDict(train=[PAIRS[0]]))

    class DataFrame(list):
        """Stands in for pandas.DataFrame, which iterates over column names."""

    with pytest.raises(TypeError, match=r"to_dict\('records'\)"):
        load_pairs(DataFrame(["prompt", "chosen", "rejected"]))


def test_pairs_with_the_same_text_are_counted_warned_and_left_out(tmp_path, caplog):
    rows = [PAIRS[0], {"prompt": "p", "chosen": "same  text", "rejected": "same text\n"}, PAIRS[1],
            {"prompt": "p", "chosen": "x", "rejected": "x"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="tokencredit.rewards.data"):
        pairs = load_pairs(path)
    assert [p.chosen for p in pairs] == ["4", "Paris."]
    assert len(caplog.records) == 1
    assert "left out 2 of 4 pairs" in caplog.text and f"first: {path}:2" in caplog.text
    msg = error_of(load_pairs, rows[1:2] + rows[3:])
    assert msg == "the given records: no usable pairs: all 2 records left out because 'chosen' and 'rejected' " \
        "are the same text"


# ---------------------------------------------------------------------- ranked lists
def test_ranked_by_scores_higher_is_better(tmp_path):
    rows = [{"prompt": "p", "responses": ["ok", "best", "worst"], "scores": [0.5, 2, -1.0]}]
    (ranked,) = load_ranked(write_jsonl(tmp_path / "r.jsonl", rows))
    assert ranked == RankedList("p", ["ok", "best", "worst"], scores=[0.5, 2.0, -1.0], ranking=None)
    assert ranked.order() == [1, 0, 2]
    assert ranked.best_first() == ["best", "ok", "worst"]
    assert ranked.preference_pairs() == [
        PreferencePair("p", "best", "ok"), PreferencePair("p", "best", "worst"), PreferencePair("p", "ok", "worst")
    ]


def test_ranked_by_ranking_zero_is_best():
    rows = [{"prompt": "p", "responses": ["second", "third", "first"], "ranking": [1, 2, 0]}]
    (ranked,) = load_ranked(rows)
    assert ranked.scores is None and ranked.ranking == [1, 2, 0]
    assert ranked.order() == [2, 0, 1] and ranked.best_first() == ["first", "second", "third"]
    assert len(ranked.preference_pairs()) == 3


def test_tied_scores_are_kept_raw_and_broken_by_an_rng():
    ranked = RankedList("p", ["a", "b", "c", "d"], scores=[1.0, 3.0, 1.0, 0.0])
    assert ranked.order() == [1, 0, 2, 3]  # ties keep input order
    assert ranked.scores == [1.0, 3.0, 1.0, 0.0]
    orders = {tuple(ranked.order(random.Random(seed))) for seed in range(40)}
    assert orders == {(1, 0, 2, 3), (1, 2, 0, 3)}
    assert ranked.order(random.Random(7)) == ranked.order(random.Random(7))
    # A tied pair is no preference.
    assert PreferencePair("p", "a", "c") not in ranked.preference_pairs()
    assert len(ranked.preference_pairs()) == 5


def test_ranked_errors_name_file_line_and_field(tmp_path):
    def err(row):
        path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}, row])
        msg = error_of(load_ranked, path)
        assert msg.startswith(f"{path}:2: "), msg
        return msg[len(f"{path}:2: "):]

    base = {"prompt": "p", "responses": ["a", "b", "c"]}
    assert err({**base, "responses": ["a"], "scores": [1]}) == "field 'responses' needs at least 2 responses to " \
        "rank, got 1"
    assert err({**base, "responses": "a b"}) == "field 'responses' must be a list of strings, got str"
    assert err({**base, "responses": ["a", 2], "scores": [1, 0]}) == "field 'responses'[1] must be a string, got int"
    assert err({**base, "responses": ["a", " "], "scores": [1, 0]}) == "field 'responses'[1] is empty"
    assert err({**base, "scores": [1, 2]}) == "field 'scores' has 2 values but 'responses' has 3 responses"
    assert err({**base, "ranking": [0, 1]}) == "field 'ranking' has 2 values but 'responses' has 3 responses"
    assert err({**base, "ranking": [0, 0, 1]}).startswith("field 'ranking' must be a permutation of 0..2")
    assert err({**base, "ranking": [1, 2, 3]}).endswith("got [1, 2, 3] (it looks 1-based)")
    assert err({**base, "ranking": [0, 1.0, 2]}) == "field 'ranking'[1] must be an integer, got 1.0"
    assert err({**base, "scores": [1, "2", 3]}) == "field 'scores'[1] must be a number, got '2'"
    assert err({**base, "scores": [1, True, 3]}) == "field 'scores'[1] must be a number, got True"
    assert err({**base, "scores": {"a": 1}}) == "field 'scores' must be a list, got dict"
    assert err({**base, "scores": [1, 2, 3], "ranking": [0, 1, 2]}).startswith(
        "give either 'scores' (higher is better) or 'ranking' (0 = best), not both"
    )
    assert err(base).startswith("missing 'scores' or 'ranking'")
    assert err({**base, "score": [1, 2, 3]}).startswith("missing 'scores' or 'ranking'")


def test_ranked_rejects_nan_and_infinite_scores(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "p", "responses": ["a", "b"], "scores": [1.0, NaN]}\n', encoding="utf-8")
    assert error_of(load_ranked, path) == f"{path}:1: field 'scores'[1] is nan; scores must be finite numbers"
    rows = [{"prompt": "p", "responses": ["a", "b"], "scores": [float("inf"), 0.0]}]
    assert error_of(load_ranked, rows) == "row 0: field 'scores'[0] is inf; scores must be finite numbers"


def test_ranked_field_names_and_reading_only_one_order_field():
    rows = [{"q": "p", "outs": ["a", "b"], "rating": [1, 5], "ranking": [0, 1]}]
    (ranked,) = load_ranked(rows, prompt_field="q", responses_field="outs", scores_field="rating", ranking_field=None)
    assert ranked.best_first() == ["b", "a"]
    assert "'rating'[1]" in error_of(load_ranked, [{**rows[0], "rating": [1, None]}], prompt_field="q",
                                     responses_field="outs", scores_field="rating", ranking_field=None)


def test_ranked_lists_with_all_scores_tied_are_left_out(caplog):
    rows = [{"prompt": "p", "responses": ["a", "b"], "scores": [1, 1]},
            {"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}]
    with caplog.at_level(logging.WARNING):
        assert len(load_ranked(rows)) == 1
    assert "left out 1 of 2 ranked lists because every 'scores' value is the same (first: row 0)" in caplog.text


def test_ranked_list_checks_itself():
    with pytest.raises(ValueError, match="not both"):
        RankedList("p", ["a", "b"], scores=[1.0, 0.0], ranking=[0, 1])
    with pytest.raises(ValueError, match="permutation"):
        RankedList("p", ["a", "b"], ranking=[1, 1])
    with pytest.raises(ValueError, match="at least 2"):
        RankedList("p", ["a"], scores=[1.0])


# ---------------------------------------------------------------------- edit triples
def test_load_edits(tmp_path):
    rows = [
        {"prompt": "p", "original": "Paris is in germany.", "edited": "Paris is in Germany.", "chosen": "Paris."},
        {"prompt": "q", "original": "a b", "edited": "a c", "chosen": None},
        {"prompt": "r", "original": "x", "edited": "y"},
    ]
    expected = [
        EditTriple("p", "Paris is in germany.", "Paris is in Germany.", "Paris."),
        EditTriple("q", "a b", "a c", None),
        EditTriple("r", "x", "y", None),
    ]
    assert load_edits(write_jsonl(tmp_path / "e.jsonl", rows)) == expected
    assert load_edits(rows) == expected
    assert load_edits(rows, chosen_field=None)[0].chosen is None


def test_load_edits_errors_and_no_op_edits(tmp_path, caplog):
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "p", "original": "a", "edited": "b", "chosen": 3}])
    assert error_of(load_edits, path) == f"{path}:1: field 'chosen' must be a string, got int"
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "p", "original": "a", "edit": "b"}])
    assert error_of(load_edits, path).startswith(f"{path}:1: field 'edited' is missing")
    rows = [{"prompt": "p", "original": "a  b", "edited": "a b"}, {"prompt": "p", "original": "a", "edited": "b"}]
    with caplog.at_level(logging.WARNING):
        assert load_edits(rows) == [EditTriple("p", "a", "b")]
    assert "left out 1 of 2 edit triples" in caplog.text


# ---------------------------------------------------------------------- unlabelled pairs
def test_load_unlabelled_pairs(tmp_path, caplog):
    rows = [{"prompt": "p", "a": "one", "b": "two"}, {"prompt": "p", "a": "same", "b": "same"}]
    with caplog.at_level(logging.WARNING):
        assert load_unlabelled_pairs(write_jsonl(tmp_path / "u.jsonl", rows)) == [UnlabelledPair("p", "one", "two")]
    assert "left out 1 of 2 unlabelled pairs" in caplog.text
    # A labelled file serves as an unlabelled pool.
    assert load_unlabelled_pairs(PAIRS, a_field="chosen", b_field="rejected")[1] == UnlabelledPair(
        "Capital of France?", "Paris.", "Lyon."
    )
    assert error_of(load_unlabelled_pairs, [{"prompt": "p", "a": "x"}]).startswith("row 0: field 'b' is missing")


# ---------------------------------------------------------------------- split
def test_split_records_is_deterministic_and_matches_the_token_rm_rule():
    items = list(range(20))
    train, held = split_records(items, 0.25, seed=3)
    assert len(held) == 5 and sorted(train + held) == items
    assert split_records(items, 0.25, seed=3) == (train, held)
    assert split_records(items, 0.25, seed=4) != (train, held)
    assert (train, held) == _split(items, 0.25, np.random.default_rng(3))
    assert split_records(["only"], 0.5, seed=0) == (["only"], [])
    assert split_records(items[:2], 0.9, seed=0)[0] != []  # train keeps at least one
    with pytest.raises(ValueError, match=r"eval_fraction must be in \[0, 1\)"):
        split_records(items, 1.0, seed=0)


# ---------------------------------------------------------------------- Hugging Face datasets
def test_loaders_accept_a_hugging_face_dataset():
    datasets = pytest.importorskip("datasets")
    assert load_pairs(datasets.Dataset.from_list(PAIRS)) == load_pairs(PAIRS)
    ranked = datasets.Dataset.from_list([
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [0.1, 0.9, 0.5]},
        {"prompt": "q", "responses": ["x", "y"], "scores": [1.0, 2.0]},
    ])
    assert [r.best_first() for r in load_ranked(ranked)] == [["b", "c", "a"], ["y", "x"]]
    # A column missing from some rows comes back as None: optional "chosen" stays None.
    edits = datasets.Dataset.from_list([
        {"prompt": "p", "original": "a", "edited": "b", "chosen": "c"},
        {"prompt": "p", "original": "a", "edited": "d", "chosen": None},
    ])
    assert [e.chosen for e in load_edits(edits)] == ["c", None]
    pool = datasets.Dataset.from_list([{"prompt": "p", "a": "one", "b": "two"}])
    assert load_unlabelled_pairs(pool) == [UnlabelledPair("p", "one", "two")]
    bad = datasets.Dataset.from_list([PAIRS[1], {"prompt": "p", "chosen": "a", "rejected": 3}])
    assert error_of(load_pairs, bad) == "row 1: field 'rejected' must be a string, got int"
    with pytest.raises(TypeError, match=r"dataset\['train'\]"):
        load_pairs(datasets.DatasetDict(train=datasets.Dataset.from_list(PAIRS)))


def test_file_errors_name_the_line_for_bytes_bom_and_nesting(tmp_path):
    from tokencredit.record_files import load_prompts, read_jsonl

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "caf\xe9", "chosen": "b"}\n')
    with pytest.raises(RewardDataError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_pairs(path)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    assert load_pairs(bom)[0].chosen == "b"
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"prompt": "a"}\n{"x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(RecordError, match="deep.jsonl:2"):
        list(read_jsonl(deep))
    txt = tmp_path / "prompts.txt"
    txt.write_bytes(b"first\r\nsecond \xff\n")
    with pytest.raises(RecordError, match=r"prompts.txt:2: not UTF-8"):
        load_prompts(txt)
