import math
import random

import pytest
import torch

from tokencredit.models import load_tokenizer
from tokencredit.rewards.data import EditTriple
from tokencredit.rewards.edits import (
    edit_examples,
    edit_opcodes,
    edit_spans,
    edit_token_labels,
    edit_units,
    span_bt_loss,
)
from tokencredit.rewards.labels import SpanLabel
from tokencredit.rewards.records import PreferencePair
from tokencredit.rewards.token_rm import TokenRewardModel
from tokencredit.rewards.token_rm_training import evaluate_token_reward_model
from tokencredit.testing import tiny_scalar_model, tiny_word_tokenizer


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer("smollm2-135m-instruct")


def marked(original, edited):
    """The texts the -1 spans cover in the original and the +1 spans cover in the edited response."""
    bad, good = edit_spans(original, edited)
    assert all(s.label == -1 for s in bad) and all(s.label == 1 for s in good)
    return [original[s.start : s.end] for s in bad], [edited[s.start : s.end] for s in good]


def pieces(tokenizer, ids):
    return [tokenizer.decode([i]) for i in ids]


# ---------------------------------------------------------------------- units and spans, by hand
def test_units_are_words_and_single_visible_symbols():
    assert edit_units("Paris is in germany.") == [
        (0, 5, "Paris"), (6, 8, "is"), (9, 11, "in"), (12, 19, "germany"), (19, 20, "."),
    ]
    assert [u for _, _, u in edit_units("Wait...?! e-mail it's x - y")] == [
        "Wait", ".", ".", ".", "?", "!", "e-mail", "it's", "x", "-", "y",
    ]
    # Emoji with a skin tone, a flag, a ZWJ family and a variation selector each stay one unit.
    assert [u for _, _, u in edit_units("ok 👍🏽 🇫🇷🇩🇪 👨\u200d👩\u200d👧 ❤️!")] == [
        "ok", "👍🏽", "🇫🇷", "🇩🇪", "👨\u200d👩\u200d👧", "❤️", "!",
    ]
    assert edit_units("") == [] and edit_units(" \n\t ") == []


def test_pure_insertion():
    assert marked("The cat sat.", "The black cat sat.") == ([], ["black"])


def test_pure_deletion():
    assert marked("The big black cat sat.", "The cat sat.") == (["big", "black"], [])


def test_replacement_in_the_middle():
    original = "I think Sydney is the capital of Australia."
    edited = "I think Canberra is the capital of Australia."
    assert marked(original, edited) == (["Sydney"], ["Canberra"])
    bad, good = edit_spans(original, edited)
    assert bad == [SpanLabel(8, 14, -1)] and good == [SpanLabel(8, 16, 1)]


def test_identical_texts_and_whitespace_only_changes_give_no_labels():
    assert edit_spans("Same text, same words.", "Same text, same words.") == ([], [])
    assert edit_spans("a  b\n\nc", "a b c") == ([], [])
    assert edit_spans("", "") == ([], [])


def test_completely_different_texts():
    assert marked("yes indeed", "no way!") == (["yes", "indeed"], ["no", "way", "!"])
    assert marked("", "Hello there") == ([], ["Hello", "there"])
    assert marked("Hello there", "") == (["Hello", "there"], [])


def test_repeated_words():
    original, edited = "the cat the dog", "the cat the the dog"
    bad, good = edit_spans(original, edited)
    assert bad == [] and len(good) == 1 and edited[good[0].start : good[0].end] == "the"
    bad, good = edit_spans("no no no", "no no")
    assert good == [] and len(bad) == 1 and "no no no"[bad[0].start : bad[0].end] == "no"
    # Each repeated wrong word is marked where it occurs, not only its first occurrence.
    assert marked("bad good bad good bad", "fine good fine good fine") == (["bad"] * 3, ["fine"] * 3)


def test_case_and_punctuation_changes():
    # The case edit marks the word; the full stop after it is unchanged and stays unlabelled.
    assert marked("Paris is in germany.", "Paris is in Germany.") == (["germany"], ["Germany"])
    assert marked("Paris is in France", "Paris is in France.") == ([], ["."])
    assert marked("Hello, world", "Hello world") == ([","], [])
    assert marked("Really?", "Really!") == (["?"], ["!"])
    assert marked("Wow!!", "Wow!") == (["!"], [])
    assert marked("its fine", "it's fine") == (["its"], ["it's"])


def test_unicode_and_emoji():
    assert marked("Ich mag Käse 😀", "Ich mag Kuchen 😎") == (["Käse", "😀"], ["Kuchen", "😎"])
    assert marked("Great job 👍🏽", "Great job 👍🏿") == (["👍🏽"], ["👍🏿"])
    assert marked("東京 は 大きい", "東京 は 小さい") == (["大きい"], ["小さい"])
    assert marked("naïve café", "naïve cafe") == (["café"], ["cafe"])


def test_multiple_spaces_and_newlines():
    original, edited = "a  b\n\nc d", "a b c\n  e"
    bad, good = edit_spans(original, edited)
    assert bad == [SpanLabel(8, 9, -1)] and good == [SpanLabel(8, 9, 1)]
    assert (original[8], edited[8]) == ("d", "e")
    original, edited = "First line.\n\n  Second  line here.", "First line.\nSecond line there.\n"
    assert marked(original, edited) == (["here"], ["there"])


# ---------------------------------------------------------------------- projection onto tokens
def test_projection_onto_smollm2_bpe_word_split_into_tokens(smol):
    orig_ids, orig_labels, edit_ids, edit_labels = edit_token_labels(
        "Where is Paris?", "Paris is in germany.", "Paris is in Germany.", smol
    )
    assert orig_ids == smol("Paris is in germany.", add_special_tokens=False)["input_ids"] + [smol.eos_token_id]
    assert pieces(smol, orig_ids[:-1]) == ["Paris", " is", " in", " germ", "any", "."]
    # Every token of the replaced word is bad; the full stop and EOS are not.
    assert orig_labels == [0, 0, 0, -1, -1, 0, 0]
    assert pieces(smol, edit_ids[:-1]) == ["Paris", " is", " in", " Germany", "."]
    assert edit_labels == [0, 0, 0, 1, 0, 0]


def test_projection_keeps_whitespace_only_tokens_neutral(smol):
    orig_ids, orig_labels, edit_ids, edit_labels = edit_token_labels(
        "", "I love  emoji 😀", "I adore  emoji 😎", smol, add_eos=False
    )
    # Tokens: "I" " love" " " " em" "oji" and the emoji in two byte-level pieces.
    assert pieces(smol, orig_ids[:5]) == ["I", " love", " ", " em", "oji"] and len(orig_ids) == 7
    assert orig_labels == [0, -1, 0, 0, 0, -1, -1]  # both pieces of the emoji are bad, the lone space is not
    assert pieces(smol, edit_ids[:4]) == ["I", " ad", "ore", " "]
    assert edit_labels == [0, 1, 1, 0, 0, 0, 1, 1]
    # Inserting blank lines changes no label.
    _, orig_labels, _, edit_labels = edit_token_labels("", "Line one.\nLine two", "Line one.\n\nLine two", smol)
    assert set(orig_labels) == {0} and set(edit_labels) == {0}


def test_projection_onto_a_word_level_tokenizer():
    tok = tiny_word_tokenizer("the cat sat on a mat rug .".split())
    orig_ids, orig_labels, edit_ids, edit_labels = edit_token_labels(
        "", "the cat sat on a mat.", "the cat sat on a rug.", tok
    )
    assert orig_labels == [0, 0, 0, 0, 0, -1, 0, 0] and edit_labels == [0, 0, 0, 0, 0, 1, 0, 0]
    assert orig_ids[-1] == edit_ids[-1] == tok.eos_token_id


def test_edit_token_labels_rejects_a_non_string_prompt(smol):
    with pytest.raises(TypeError, match="prompt must be a string"):
        edit_token_labels(None, "a", "b", smol)


# ---------------------------------------------------------------------- properties on random edits
_VOCAB = "the a cat dog sat on mat Paris paris Germany germany is in of , . ! ? 😀 👍🏽 café naïve it's e-mail 42"
_VOCAB = _VOCAB.split()
_SPACES = [" ", " ", " ", "  ", "\n", "\n\n", "\t"]


def _random_text(rng, words):
    out = ""
    for k, w in enumerate(words):
        if k:
            # Punctuation is often glued to the word before it, as in real text.
            out += "" if w in ",.!?" and rng.random() < 0.7 else rng.choice(_SPACES)
        out += w
    return out


def _random_edit(rng, words):
    words = list(words)
    for _ in range(rng.randint(0, 3)):
        op = rng.choice(["insert", "delete", "replace", "case"])
        k = rng.randrange(len(words) + (op == "insert")) if words or op == "insert" else None
        if k is None:
            continue
        if op == "insert":
            words.insert(k, rng.choice(_VOCAB))
        elif op == "delete":
            del words[k]
        elif op == "replace":
            words[k] = rng.choice(_VOCAB)
        else:
            words[k] = words[k].swapcase()
    return words


def _cases(n, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        words = [rng.choice(_VOCAB) for _ in range(rng.randint(0, 12))]
        yield _random_text(rng, words), _random_text(rng, _random_edit(rng, words))


def test_applying_the_opcodes_reconstructs_the_edited_units():
    for original, edited in _cases(300):
        a = [u for _, _, u in edit_units(original)]
        b = [u for _, _, u in edit_units(edited)]
        rebuilt = []
        for tag, i1, i2, j1, j2 in edit_opcodes(original, edited):
            if tag == "equal":
                assert a[i1:i2] == b[j1:j2]
                rebuilt += a[i1:i2]
            else:
                rebuilt += b[j1:j2]
        assert rebuilt == b, (original, edited)


def test_span_properties_on_random_edits():
    for original, edited in _cases(300, seed=1):
        bad, good = edit_spans(original, edited)
        assert all(s.label == -1 and s.end <= len(original) for s in bad)
        assert all(s.label == 1 and s.end <= len(edited) for s in good)
        # Spans are units: no whitespace inside; sorted and disjoint.
        for text, spans in ((original, bad), (edited, good)):
            assert all(not any(c.isspace() for c in text[s.start : s.end]) for s in spans)
            assert all(x.end <= y.start for x, y in zip(spans, spans[1:]))
        # What stays unlabelled on each side is the same sequence of units: the part the edit kept.
        kept_a = [u for s, _, u in edit_units(original) if not any(b.start == s for b in bad)]
        kept_b = [u for s, _, u in edit_units(edited) if not any(g.start == s for g in good)]
        assert kept_a == kept_b, (original, edited)
        if original.split() == edited.split():
            assert bad == good == []


def test_projected_labels_are_one_sided_on_random_edits(smol):
    for original, edited in _cases(60, seed=2):
        if not original.strip() or not edited.strip():
            continue
        orig_ids, orig_labels, edit_ids, edit_labels = edit_token_labels("", original, edited, smol)
        assert len(orig_ids) == len(orig_labels) and len(edit_ids) == len(edit_labels)
        assert set(orig_labels) <= {-1, 0} and set(edit_labels) <= {0, 1}
        bad, good = edit_spans(original, edited)
        assert (-1 in orig_labels) == bool(bad) and (1 in edit_labels) == bool(good)


# ---------------------------------------------------------------------- training examples
def test_edit_examples_feed_the_token_rm():
    triple = EditTriple("Capital of Australia?", "It is Sydney.", "It is Canberra.", chosen="Canberra.")
    orig_ex, edit_ex, pair = edit_examples(triple)
    assert (orig_ex.prompt, orig_ex.response, orig_ex.spans) == (triple.prompt, "It is Sydney.", [SpanLabel(6, 12, -1)])
    assert (edit_ex.response, edit_ex.spans) == ("It is Canberra.", [SpanLabel(6, 14, 1)])
    assert pair == PreferencePair(triple.prompt, "It is Canberra.", "It is Sydney.")
    tok = tiny_word_tokenizer("Capital of Australia ? It is Sydney Canberra .".split())
    rm = TokenRewardModel(tiny_scalar_model(len(tok)), tok)
    metrics = evaluate_token_reward_model(rm, [orig_ex, edit_ex], [pair])
    assert metrics["labelled_tokens"] == 2 and metrics["pairs"] == 1


# ---------------------------------------------------------------------- span BT loss
def test_span_bt_loss_hand_computed():
    edit_rewards = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 9.0]])
    edit_plus = torch.tensor([[0, 1, 1], [0, 1, 0]])
    orig_rewards = torch.tensor([[0.3, -1.0], [0.5, 7.0]])
    orig_minus = torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)
    # Row 0: 2.0 + 0.5 - 0.3 = 2.2; row 1: -1.0 - 0.5 = -1.5. -log sigma(m) = log(1 + e^-m).
    expected = (math.log1p(math.exp(-2.2)) + math.log1p(math.exp(1.5))) / 2
    assert span_bt_loss(edit_rewards, edit_plus, orig_rewards, orig_minus).item() == pytest.approx(expected, rel=1e-6)


def test_span_bt_loss_with_empty_sets_is_log_two():
    rewards = torch.randn(3, 4)
    empty = torch.zeros(3, 4)
    assert span_bt_loss(rewards, empty, rewards, empty).item() == pytest.approx(math.log(2))


def test_span_bt_loss_gradient_raises_edited_and_lowers_original_tokens():
    edit_rewards = torch.tensor([[0.2, -0.4, 1.0]], requires_grad=True)
    orig_rewards = torch.tensor([[0.7, 0.1]], requires_grad=True)
    loss = span_bt_loss(edit_rewards, torch.tensor([[1, 1, 0]]), orig_rewards, torch.tensor([[0, 1]]))
    loss.backward()
    # d/dm -log sigma(m) = -(1 - sigma(m)); m = 0.2 - 0.4 - 0.1 = -0.3.
    g = 1 - 1 / (1 + math.exp(0.3))
    assert edit_rewards.grad[0].tolist() == pytest.approx([-g, -g, 0.0])
    assert orig_rewards.grad[0].tolist() == pytest.approx([0.0, g])
    # Gradient descent therefore raises the +1 tokens and lowers the -1 tokens; unlabelled ones are untouched.


def test_span_bt_loss_checks_shapes():
    with pytest.raises(ValueError, match="same shape"):
        span_bt_loss(torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="same B"):
        span_bt_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(1, 3), torch.zeros(1, 3))
