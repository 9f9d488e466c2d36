import json
import math
from pathlib import Path

import pytest

from tokencredit.record_files import RecordError
from tokencredit.tasks.querygen import (
    BASE_PROMPT_END,
    HistoryEntry,
    PromptTemplate,
    QueryDataError,
    QuerySession,
    builtin_sessions,
    load_sessions,
    normalize_query,
    parse_session,
    per_example_metrics,
    query_metrics,
    query_tokens,
    render_prompt,
    session_context,
    split_sessions,
)
from tokencredit.testing import tiny_word_tokenizer

TREC_FILE = Path("/work/shared/data/querygen/trec2013_sessions.jsonl")
GOOD = {"history": [{"query": "python list sort", "clicked": ["Python List sort() Method - W3Schools"]}],
        "target_query": "python sort list of dicts by key"}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def session(*queries, clicked=(), target="next query"):
    """A session whose i-th entry has query queries[i] and clicked[i] (or no clicks)."""
    clicks = list(clicked) + [[]] * (len(queries) - len(clicked))
    return QuerySession([HistoryEntry(q, list(c)) for q, c in zip(queries, clicks)], target)


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


# --- records --------------------------------------------------------------------------------------------

BAD_RECORDS = {
    "missing history": ({"target_query": "x"}, "missing 'history'"),
    "empty history": ({"history": [], "target_query": "x"}, "'history' is empty"),
    "history not a list": ({"history": "cheap flights", "target_query": "x"}, "'history' must be a list"),
    "entry not an object": ({"history": ["cheap flights"], "target_query": "x"}, "history[0] must be an object"),
    "entry without query": ({"history": [{"clicked": []}], "target_query": "x"}, "'query' must be a non-empty"),
    "query not a string": ({"history": [{"query": 3}], "target_query": "x"}, "'query' must be a non-empty"),
    "empty query": ({"history": [{"query": "  "}], "target_query": "x"}, "'query' must be a non-empty"),
    "clicked a string": ({"history": [{"query": "a", "clicked": "Title"}], "target_query": "x"},
                         "'clicked' must be a list of strings"),
    "clicked not strings": ({"history": [{"query": "a", "clicked": ["ok", 7]}], "target_query": "x"},
                            "'clicked' must be a list of strings"),
    "missing target": ({"history": [{"query": "a"}]}, "missing 'target_query'"),
    "empty target": ({"history": [{"query": "a"}], "target_query": " "}, "'target_query' is empty"),
    "target not a string": ({"history": [{"query": "a"}], "target_query": ["x"]}, "'target_query' must be a string"),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_bad_record_in_file_names_file_and_line(tmp_path, kind):
    record, message = BAD_RECORDS[kind]
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, "", record])  # line 2 is blank, the bad one is line 3
    with pytest.raises(QueryDataError) as info:
        load_sessions(path)
    assert f"{path}:3: " in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_bad_record_in_memory_names_record(kind):
    record, message = BAD_RECORDS[kind]
    with pytest.raises(QueryDataError, match=r"^record 1: ") as info:
        load_sessions([GOOD, record])
    assert message in str(info.value)


def test_bad_json_missing_file_and_empty_source_are_query_data_errors(tmp_path):
    with pytest.raises(QueryDataError, match=r"data.jsonl:2: not valid JSON"):
        load_sessions(write_jsonl(tmp_path / "data.jsonl", [GOOD, "{oops"]))
    with pytest.raises(QueryDataError, match="no such file"):
        load_sessions(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(QueryDataError, match="no sessions"):
        load_sessions(str(tmp_path / "empty.jsonl"))
    with pytest.raises(QueryDataError, match="no sessions"):
        load_sessions([])
    assert issubclass(QueryDataError, RecordError) and issubclass(QueryDataError, ValueError)


def test_parse_session_fields_defaults_and_extras():
    record = {
        "history": [{"query": " cheap flights ", "clicked_urls": ["http://x"]}, {"query": "b", "clicked": None}],
        "target_query": " flights to paris ",
        "session_id": 17,
        "user_id": 4,
        "topic_desc": "ignored",
    }
    parsed = parse_session(record, "here")
    assert parsed == QuerySession(
        [HistoryEntry("cheap flights", []), HistoryEntry("b", [])], "flights to paris", id="17", user_id="4"
    )
    assert parse_session(dict(GOOD, id="a", session_id="b"), "here").id == "a"
    assert parse_session(GOOD, "here").id is None and parse_session(GOOD, "here").user_id is None
    with pytest.raises(QueryDataError, match="^here: expected an object"):
        parse_session(["not", "a", "dict"], "here")


def test_load_from_list_and_hf_dataset():
    # Same keys in every record: Dataset.from_list takes its columns from the first one.
    records = [dict(GOOD, user_id="u0"), dict(GOOD, target_query="python sorted reverse", user_id="u1")]
    sessions = load_sessions(records)
    assert [s.target_query for s in sessions] == ["python sort list of dicts by key", "python sorted reverse"]
    assert sessions[0].history[0].clicked == ["Python List sort() Method - W3Schools"]

    datasets = pytest.importorskip("datasets")
    assert load_sessions(datasets.Dataset.from_list(records)) == sessions
    # A history column declared as Sequence({...}) comes back as a dict of lists.
    features = datasets.Features({
        "history": datasets.Sequence({"query": datasets.Value("string"),
                                      "clicked": datasets.Sequence(datasets.Value("string"))}),
        "target_query": datasets.Value("string"),
    })
    columnar = datasets.Dataset.from_list([GOOD], features=features)
    assert load_sessions(columnar) == [QuerySession(sessions[0].history, sessions[0].target_query)]


# --- prompts --------------------------------------------------------------------------------------------


def test_render_prompt_plain_keeps_last_entries_oldest_first():
    s = session("q1", "q2", "q3", "q4", "q5", "q6", clicked=[[], [], ["T3a", "T3b", "T3c"]])
    text = render_prompt(s, template=PromptTemplate(max_history=4, max_clicked=2))
    assert text.startswith(PromptTemplate().instruction + "\n\nSearches so far:\n")
    assert text.endswith("\n" + BASE_PROMPT_END)
    body = text.split("Searches so far:\n")[1]
    assert body == (
        "1. q3\n"
        "   clicked: T3a\n"
        "   clicked: T3b\n"
        "2. q4\n"
        "3. q5\n"
        "4. q6\n"
        "Next query:"
    )
    assert "q2" not in text and "T3c" not in text


def test_render_prompt_cuts_long_titles_and_flattens_newlines():
    long_title = "How to Sort a List of Dictionaries by a Value of the Dictionary in Python - Stack Overflow"
    assert len(long_title) > 80
    text = render_prompt(session("python\nsort", clicked=[[long_title, "Short\ntitle"]]))
    lines = text.splitlines()
    cut = lines[lines.index("1. python sort") + 1].removeprefix("   clicked: ")
    assert len(cut) == 80 and cut.endswith("…") and long_title.startswith(cut[:-1])
    assert "   clicked: Short title" in lines
    custom = render_prompt(session("a", clicked=[[long_title]]), template=PromptTemplate(max_title_chars=20))
    assert "   clicked: How to Sort a List…" in custom.splitlines()


def test_render_prompt_chat_template_and_plain_fallbacks():
    s = session("cheap flights paris", clicked=[["Cheap Flights to Paris - Skyscanner"]])
    chat_tok = tiny_word_tokenizer(["a"])
    chat_tok.chat_template = CHAT_TEMPLATE
    chat = render_prompt(s, chat_tok)
    assert chat.startswith("<|user|>" + PromptTemplate().instruction + "\n\nSearches so far:\n1. cheap flights paris")
    assert chat.endswith("   clicked: Cheap Flights to Paris - Skyscanner\n<|assistant|>")
    assert "system" not in chat and BASE_PROMPT_END not in chat

    plain = render_prompt(s)
    assert render_prompt(s, chat_tok, chat=False) == plain
    assert render_prompt(s, tiny_word_tokenizer(["a"])) == plain  # no chat template set: plain text
    with pytest.raises(ValueError, match="chat_template"):
        render_prompt(s, tiny_word_tokenizer(["a"]), chat=True)
    no_instruction = render_prompt(s, template=PromptTemplate(instruction=""))
    assert no_instruction.startswith("Searches so far:\n")


def test_instruction_as_system_message_on_smollm2():
    from tokencredit.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    s = session("cheap flights paris", clicked=[["Cheap Flights to Paris - Skyscanner"]])
    as_system = render_prompt(s, tok, PromptTemplate(instruction_as_system=True))
    default = render_prompt(s, tok)
    assert as_system.startswith("<|im_start|>system\n" + PromptTemplate().instruction + "<|im_end|>")
    assert "<|im_start|>user\nSearches so far:\n1. cheap flights paris" in as_system
    # SmolLM2's own default system prompt is replaced, not added to: the prompt gets shorter.
    assert "SmolLM" in default and "SmolLM" not in as_system
    assert len(tok(as_system).input_ids) < len(tok(default).input_ids)


def test_prompt_template_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_history"):
        PromptTemplate(max_history=0)
    with pytest.raises(ValueError, match="max_clicked"):
        PromptTemplate(max_clicked=-1)


def test_session_context_follows_rendered_history():
    s = session("q1", "q2", "q3", clicked=[["A"], ["B", "C", "D"], []], target="q4")
    assert session_context(s) == {"target": "q4", "clicked": ["A", "B", "C"], "queries": ["q1", "q2", "q3"]}
    small = PromptTemplate(max_history=2, max_clicked=1)
    assert session_context(s, small) == {"target": "q4", "clicked": ["B"], "queries": ["q2", "q3"]}


# --- metrics --------------------------------------------------------------------------------------------


def test_normalize_query_and_tokens():
    assert normalize_query('  "Cheap   Flights\tParis?" ') == "cheap flights paris"
    assert normalize_query("“401(k) limits”.") == "401(k) limits"
    assert normalize_query("") == ""
    assert query_tokens("Don't sort() node.js, e-bike!") == ["don't", "sort", "node.js", "e-bike"]


def test_per_example_metrics_hand_computed():
    assert per_example_metrics('"Cheap Flights Paris."', "cheap flights paris") == {
        "em": 1.0, "f1": 1.0, "p": 1.0, "r": 1.0, "rouge_l": 1.0, "words": 3.0, "ref_words": 3.0}
    # 3 shared words; precision 3/3, recall 3/5 -> F1 = 2 * 1 * 0.6 / 1.6 = 0.75.
    partial = per_example_metrics("cheap flights paris", "cheap flights to paris june")
    assert partial["em"] == 0.0 and partial["f1"] == pytest.approx(0.75)
    assert (partial["p"], partial["r"], partial["words"], partial["ref_words"]) == (1.0, 0.6, 3.0, 5.0)
    # A longer query with one extra wrong word: recall kept, precision down.
    longer = per_example_metrics("cheap flights to paris june hotel", "cheap flights to paris june")
    assert (longer["p"], longer["r"]) == (pytest.approx(5 / 6), 1.0)
    # LCS("cheap flights to paris", "cheap paris flights") = 2 -> P 2/4, R 2/3, F = 4/7.
    assert per_example_metrics("cheap flights to paris", "cheap paris flights")["rouge_l"] == pytest.approx(4 / 7)
    assert per_example_metrics("", "cheap flights") == {"em": 0.0, "f1": 0.0, "p": 0.0, "r": 0.0, "rouge_l": 0.0,
                                                        "words": 0.0, "ref_words": 2.0}
    assert per_example_metrics("hotels rome", "cheap flights")["f1"] == 0.0


def test_query_metrics_means_and_bleu():
    perfect = query_metrics(["python sort list of dicts by key", "a"], ["Python sort list of dicts by key", "A"])
    assert perfect == {"exact_match": 1.0, "token_f1": 1.0, "token_precision": 1.0, "token_recall": 1.0, "bleu": 1.0,
                       "rouge_l": 1.0, "mean_words": 4.0}

    scores = query_metrics(["cheap flights paris", "hotels rome"], ["cheap flights to paris june", "hotels rome"])
    assert scores["exact_match"] == 0.5
    assert scores["token_f1"] == pytest.approx((0.75 + 1.0) / 2)
    assert scores["rouge_l"] == pytest.approx((0.75 + 1.0) / 2)
    assert 0.0 < scores["bleu"] < 1.0
    # All n-grams of "a b c" match and it has no 4-grams (effective order), so BLEU = brevity penalty e^(1-4/3).
    assert query_metrics(["a b c"], ["a b c d"])["bleu"] == pytest.approx(math.exp(1 - 4 / 3))
    assert query_metrics(["x y"], ["a b"]) == {"exact_match": 0.0, "token_f1": 0.0, "token_precision": 0.0,
                                               "token_recall": 0.0, "bleu": 0.0, "rouge_l": 0.0, "mean_words": 2.0}
    assert scores["token_precision"] == 1.0 and scores["token_recall"] == pytest.approx((0.6 + 1.0) / 2)


def test_query_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        query_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        query_metrics([], [])
    with pytest.raises(ValueError, match="not a single string"):
        query_metrics("abc", "abc")


# --- data -----------------------------------------------------------------------------------------------


def test_builtin_sessions_sizes_and_user_split():
    train, test = builtin_sessions("train"), builtin_sessions("test")
    assert (len(train), len(test)) == (287, 73)  # as in data/querygen/README.md
    train_users, test_users = {s.user_id for s in train}, {s.user_id for s in test}
    assert None not in train_users | test_users
    assert not train_users & test_users
    ids = [s.id for s in train + test]
    assert len(set(ids)) == len(ids)
    for s in train + test:
        assert 1 <= len(s.history) <= 4
        assert normalize_query(s.target_query) not in {normalize_query(e.query) for e in s.history}
        assert len(render_prompt(s)) <= 470  # the generator's prompt budget (~125 SmolLM2 tokens)
    with pytest.raises(ValueError, match="split"):
        builtin_sessions("validation")


def test_split_sessions_groups_users_and_is_deterministic():
    sessions = [QuerySession([HistoryEntry("q", [])], f"t{i}", id=str(i), user_id=f"u{i // 3}") for i in range(30)]
    train, test = split_sessions(sessions, test_fraction=0.2, seed=1)
    assert len(train) + len(test) == 30 and 5 <= len(test) <= 8
    assert not {s.user_id for s in train} & {s.user_id for s in test}
    assert [s.id for s in test] == sorted((s.id for s in test), key=int)  # input order kept
    assert split_sessions(sessions, test_fraction=0.2, seed=1) == (train, test)
    assert split_sessions(sessions, test_fraction=0.2, seed=2) != (train, test)

    rows_train, rows_test = split_sessions(sessions, test_fraction=0.2, seed=1, by_user=False)
    assert len(rows_test) == 6
    no_users = [QuerySession(s.history, s.target_query, id=s.id) for s in sessions]
    assert len(split_sessions(no_users, test_fraction=0.5)[1]) == 15
    with pytest.raises(ValueError, match="test_fraction"):
        split_sessions(sessions, test_fraction=1.0)


@pytest.mark.skipif(not TREC_FILE.is_file(), reason="TREC 2013 session file not present")
def test_trec_sessions_parse():
    sessions = load_sessions(TREC_FILE)
    assert len(sessions) == 251
    assert all(s.history and s.target_query for s in sessions)
    assert all(len(render_prompt(s).splitlines()) >= 4 for s in sessions)
