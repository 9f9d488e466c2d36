from tokencredit.rewards.examples import PositiveWords
from tokencredit.testing import tiny_word_tokenizer


def test_positive_words_rewards_land_on_the_right_tokens():
    tok = tiny_word_tokenizer("the day was lovely but the bus late".split())
    fn = PositiveWords(tok)
    ids = tok("the day was lovely but the bus late", add_special_tokens=False)["input_ids"]
    (row,) = fn(["p"], ["the day was lovely but the bus late"], [ids])
    assert row == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    assert len(row) == len(ids)
