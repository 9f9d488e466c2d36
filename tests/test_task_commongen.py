import json
import math
from pathlib import Path

import pytest

from tokencredit.record_files import RecordError
from tokencredit.rewards.tokens import rewards_to_tensor
from tokencredit.tasks.commongen import (
    BASE_PROMPT_END,
    DEFAULT_WEIGHTS,
    ConceptDataError,
    ConceptSet,
    commongen_metrics,
    commongen_reward,
    commongen_reward_fn,
    concept_coverage,
    concept_prompt,
    first_line,
    load_concept_sets,
    sentence_scores,
)
from tokencredit.testing import tiny_word_tokenizer

COMMONGEN = Path("/work/shared/data/commongen")
GOOD = {"concepts": ["dog", "frisbee", "throw"], "references": ["A man throws a frisbee to his dog."]}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# -- records --------------------------------------------------------------------------------------------


def test_load_concept_sets_from_file_and_dicts(tmp_path):
    blind = {"concepts": ["cat", "sofa"], "id": 3}
    records = load_concept_sets(write_jsonl(tmp_path / "c.jsonl", [GOOD, blind]))
    assert records == [ConceptSet(GOOD["concepts"], GOOD["references"]), ConceptSet(["cat", "sofa"], [], "3")]
    assert load_concept_sets([GOOD]) == records[:1]
    assert issubclass(ConceptDataError, RecordError)


@pytest.mark.parametrize("bad, message", [
    ({"references": ["x"]}, "missing 'concepts'"),
    ({"concepts": []}, "'concepts' is empty"),
    ({"concepts": ["dog", ""]}, "non-empty strings"),
    ({"concepts": "dog cat"}, "must be a list"),
    ({"concepts": ["dog"], "references": "A dog."}, "'references' must be a list"),
])
def test_loader_errors_name_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(ConceptDataError, match=rf"c\.jsonl:3: .*{message}"):
        load_concept_sets(path)
    with pytest.raises(ConceptDataError, match=rf"^record 0: .*{message}"):
        load_concept_sets([bad])


def test_loader_bad_json(tmp_path):
    with pytest.raises(ConceptDataError, match=r"c\.jsonl:1: not valid JSON"):
        load_concept_sets(write_jsonl(tmp_path / "c.jsonl", ["[1,"]))


# -- prompts --------------------------------------------------------------------------------------------


def test_concept_prompt_plain_and_chat():
    plain = concept_prompt(["dog", "frisbee", "throw"])
    assert plain == ("Write one short, everyday sentence that uses all of these words: dog, frisbee, throw.\n"
                     f"{BASE_PROMPT_END}")
    assert concept_prompt(ConceptSet(["dog", "frisbee", "throw"])) == plain
    tok = tiny_word_tokenizer(["dog"])
    tok.chat_template = CHAT_TEMPLATE
    chat = concept_prompt(["dog", "cat"], tok)
    assert chat.startswith("<|user|>Write one") and chat.endswith("<|assistant|>") and BASE_PROMPT_END not in chat
    assert concept_prompt(["dog", "cat"], tok, chat=False).endswith(BASE_PROMPT_END)
    with pytest.raises(ValueError, match="chat_template"):
        concept_prompt(["dog"], tiny_word_tokenizer(["dog"]), chat=True)


# -- coverage -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sentence, concepts, expected", [
    ("A dog catches the frisbee.", ["dog", "catch", "frisbee"], 1.0),
    ("Two dogs were running.", ["dog", "run"], 1.0),  # plural and -ing
    ("She ran and then stood still.", ["run", "stand", "sit"], 2 / 3),  # irregular past; "sit" absent
    ("Geese swam; children watched.", ["goose", "swim", "child", "watch"], 1.0),  # irregular plurals and past
    ("The kids are DANCING in the room!", ["dance", "kid", "room"], 1.0),  # case and punctuation blind
    ("A dog's bone.", ["dog", "bone", "cat"], 2 / 3),  # possessive splits off
    ("The runner waits.", ["run", "wait"], 1 / 2),  # derivation is not inflection
    ("Hotdog stand.", ["dog", "stand"], 1 / 2),  # whole words only
    ("They ate ice cream.", ["ice cream", "eat"], 1.0),  # multi-word concept as consecutive words
    ("Cream with ice.", ["ice cream"], 0.0),
    ("dog dog dog", ["dog", "dog", "cat"], 1 / 2),  # each concept counted once
])
def test_concept_coverage_hand_checked(sentence, concepts, expected):
    assert concept_coverage(sentence, concepts) == pytest.approx(expected)


def test_concept_coverage_rejects_bad_input():
    with pytest.raises(ValueError, match="not a single string"):
        concept_coverage("a dog", "dog")
    with pytest.raises(ValueError, match="no concepts"):
        concept_coverage("a dog", [" "])


# -- reward ---------------------------------------------------------------------------------------------


def test_combined_reward_hand_checked():
    refs, concepts = ["a dog runs in the park"], ["dog", "run", "park"]
    scores = sentence_scores("a dog runs", refs, concepts)
    # coverage 2/3; ROUGE-L: LCS 3, precision 3/3, recall 3/6 -> F = 2/3; BLEU: every n-gram up to 3 matches
    # (no 4-grams, effective order), brevity penalty exp(1 - 6/3) -> exp(-1).
    assert scores["coverage"] == pytest.approx(2 / 3)
    assert scores["rouge_l"] == pytest.approx(2 / 3)
    assert scores["bleu"] == pytest.approx(math.exp(-1))
    expected = 0.5 * 2 / 3 + 0.25 * 2 / 3 + 0.25 * math.exp(-1)
    assert commongen_reward("a dog runs", refs, concepts) == pytest.approx(expected)
    assert commongen_reward("a dog runs", refs, concepts, {"coverage": 1.0}) == pytest.approx(2 / 3)
    # A reference copied verbatim scores 1 on every part; unrelated text scores 0.
    assert commongen_reward("A dog runs in the park", refs, concepts) == pytest.approx(1.0)
    assert commongen_reward("zebras sing", refs, concepts) == pytest.approx(0.0)
    assert sum(DEFAULT_WEIGHTS.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown reward weights"):
        commongen_reward("a dog", refs, concepts, {"cider": 1.0})
    with pytest.raises(ValueError, match="no references"):
        commongen_reward("a dog", [], concepts)


def test_reward_fn_follows_the_contract():
    records = [ConceptSet(["dog", "run", "park"], ["a dog runs in the park"]),
               ConceptSet(["cat", "sofa"], ["The cat sleeps on the sofa."])]
    fn = commongen_reward_fn(records)
    prompts = [concept_prompt(r.concepts) for r in records] + [concept_prompt(records[0].concepts)]
    responses = [" a dog runs\nand more dog park run", "The cat sleeps on the sofa.", "\n\n"]
    rewards = fn(prompts, responses, [[1, 2], [3], [4]])
    assert len(rewards) == 3 and all(isinstance(r, float) and 0.0 <= r <= 1.0 for r in rewards)
    # Only the first line counts, so the trailing concept list earns nothing.
    assert rewards[0] == pytest.approx(commongen_reward("a dog runs", *_refs_concepts(records[0])))
    assert rewards[1] == pytest.approx(1.0) and rewards[2] == 0.0
    assert rewards_to_tensor(rewards, [2, 1, 1]).shape == (3, 2)
    with pytest.raises(ValueError, match="row 1: prompt is not one of this task's prompts"):
        fn([prompts[0], "Write about a horse"], ["x", "y"], [[1], [2]])
    with pytest.raises(ValueError, match="one of each per row"):
        fn(prompts, responses[:2], [[1]] * 3)


def _refs_concepts(record):
    return record.references, record.concepts


def test_reward_fn_with_rendered_prompts_and_shared_concept_sets():
    records = [ConceptSet(["dog", "run"], ["a dog runs"]), ConceptSet(["dog", "run"], ["dogs run fast"])]
    fn = commongen_reward_fn(records, prompts=["<chat>dog, run", "<chat>dog, run"])
    # The two records share a prompt, so their references pool: either one verbatim scores 1.
    assert fn(["<chat>dog, run"] * 2, ["a dog runs", "dogs run fast"], [[1], [1]]) == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="no references"):
        commongen_reward_fn([ConceptSet(["dog"])])
    with pytest.raises(ValueError, match="1 prompts for 2 records"):
        commongen_reward_fn(records, prompts=["p"])


def test_first_line():
    assert first_line("\n  A dog runs. \nMore") == "A dog runs."
    assert first_line("  \n") == ""


# -- metrics --------------------------------------------------------------------------------------------


def test_commongen_metrics():
    records = [ConceptSet(["dog", "run", "park"], ["a dog runs in the park", "dogs run in parks"]),
               ConceptSet(["cat", "sofa"], ["the cat sleeps on the sofa"])]
    perfect = commongen_metrics(["a dog runs in the park", "the cat sleeps on the sofa"], records)
    assert perfect == pytest.approx({"bleu": 1.0, "rouge_l": 1.0, "coverage": 1.0, "full_coverage": 1.0,
                                     "mean_length": 6.0})
    partial = commongen_metrics(["a dog runs", "zebras"], records)
    assert partial["coverage"] == pytest.approx((2 / 3 + 0) / 2)
    assert partial["full_coverage"] == 0.0 and partial["mean_length"] == 2.0
    assert 0.0 <= partial["bleu"] < 1.0 and 0.0 < partial["rouge_l"] < 1.0
    with pytest.raises(ValueError, match="1 predictions but 2 records"):
        commongen_metrics(["x"], records)
    with pytest.raises(ValueError, match="record 0 has no references"):
        commongen_metrics(["x"], [ConceptSet(["dog"])])


# -- real data --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (COMMONGEN / "dev.jsonl").is_file(), reason="shared CommonGen data not present")
def test_real_dev_references_cover_their_concepts():
    records = load_concept_sets(COMMONGEN / "dev.jsonl")[:200]
    assert all(r.concepts and r.references for r in records)
    # People asked to use every concept nearly always do, so the matcher should agree on their sentences.
    coverage = sum(concept_coverage(r.references[0], r.concepts) for r in records) / len(records)
    assert coverage > 0.97
    fn = commongen_reward_fn(records)
    rewards = fn([concept_prompt(r.concepts) for r in records[:5]], [r.references[0] for r in records[:5]],
                 [[1]] * 5)
    assert all(r == pytest.approx(1.0) for r in rewards)
