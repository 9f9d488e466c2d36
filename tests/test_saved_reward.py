"""Any saved reward model is a PPO reward: `reward=rm:PATH` from the command line and from Python."""

import json
import math
import random

import pytest
import yaml

from tokencredit.cli import main
from tokencredit.models import ScalarHeadModel, apply_chat
from tokencredit.rewards.saved import SavedRewardSettings, load_saved_reward_model, reward_from_saved_rm
from tokencredit.rewards.seq_rm import SequenceRewardModel
from tokencredit.rewards.token_rm import TokenRewardModel
from tokencredit.runs import read_metrics
from tokencredit.testing import save_tiny_causal_lm, tiny_word_tokenizer, toy_preference_pairs

WORDS = "a b c d x y".split()
CHAT = "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}{% if add_generation_prompt %}a{% endif %}"


def _with_random_head(rm):
    import torch

    torch.manual_seed(0)
    torch.nn.init.normal_(rm.model.head.weight, std=0.5)
    torch.nn.init.normal_(rm.model.head.bias, std=0.5)
    return rm


@pytest.fixture
def folders(tmp_path):
    backbone = save_tiny_causal_lm(tmp_path / "backbone", WORDS)
    token = _with_random_head(TokenRewardModel.from_pretrained(backbone))
    token.save_pretrained(tmp_path / "token-rm")
    seq = _with_random_head(SequenceRewardModel.from_pretrained(backbone))
    seq.save_pretrained(tmp_path / "seq-rm")
    chat = _with_random_head(TokenRewardModel.from_pretrained(backbone))
    chat.tokenizer.chat_template = CHAT
    chat.prompt_format = {"chat_template": True, "system_prompt": "b"}
    chat.save_pretrained(tmp_path / "chat-rm")
    return tmp_path


def test_the_folder_records_its_kind_and_prompt_format(folders):
    infos = {name: json.loads((folders / name / "tokencredit_reward.json").read_text())
             for name in ("token-rm", "seq-rm", "chat-rm")}
    assert [infos[n]["kind"] for n in ("token-rm", "seq-rm", "chat-rm")] == ["token", "sequence", "token"]
    assert infos["token-rm"]["prompt_format"] == {"chat_template": False}
    assert infos["chat-rm"]["prompt_format"] == {"chat_template": True, "system_prompt": "b"}
    assert isinstance(load_saved_reward_model(folders / "seq-rm"), SequenceRewardModel)


def test_each_placement_scores_what_it_says(folders):
    tok = tiny_word_tokenizer(WORDS)
    prompts, ids = ["a b", "c"], [tok("x y a", add_special_tokens=False)["input_ids"],
                                  tok("y", add_special_tokens=False)["input_ids"]]
    rm = TokenRewardModel.from_pretrained(folders / "token-rm")
    rows = rm.score_token_ids(prompts, ids)
    token = reward_from_saved_rm(folders / "token-rm", tok)(prompts, ["", ""], ids)
    assert [pytest.approx(r) for r in rows] == token
    summed = reward_from_saved_rm(folders / "token-rm", tok, SavedRewardSettings(placement="sum", scale=2.0))
    assert summed(prompts, ["", ""], ids) == pytest.approx([2 * sum(r) for r in rows])
    texts = ["x y a", "y"]
    seq_scores = SequenceRewardModel.from_pretrained(folders / "seq-rm").score_sequences(prompts, texts)
    ser = reward_from_saved_rm(folders / "seq-rm", tok, SavedRewardSettings(sigmoid_baseline=0.5))
    assert ser(prompts, texts, ids) == pytest.approx([1 / (1 + math.exp(-r)) - 0.5 for r in seq_scores])
    # A policy with another tokenizer gets the same scores: a sequence RM reads the text.
    other = tiny_word_tokenizer([*WORDS, "z"])
    assert reward_from_saved_rm(folders / "seq-rm", other, SavedRewardSettings(sigmoid_baseline=0.5))(
        prompts, texts, [[0], [0]]) == pytest.approx([1 / (1 + math.exp(-r)) - 0.5 for r in seq_scores])


def test_prompts_reach_the_reward_model_in_its_own_format(folders):
    tok = tiny_word_tokenizer(WORDS)
    ids = [tok("x y", add_special_tokens=False)["input_ids"]]
    chat_rm = TokenRewardModel.from_pretrained(folders / "chat-rm")
    expected = chat_rm.score_token_ids(apply_chat(chat_rm.tokenizer, ["a b"], "b"), ids)
    # PPO passes the policy's rendering of the prompt; the reward goes back to the raw text, then chats it.
    fn = reward_from_saved_rm(folders / "chat-rm", tok, raw_prompt={"<policy form of a b>": "a b"}.get)
    assert fn(["<policy form of a b>"], [""], ids) == [pytest.approx(expected[0])]
    # Given the raw text as is, the chat-trained model would have scored otherwise: the rendering matters.
    assert chat_rm.score_token_ids(["a b"], ids) != [pytest.approx(expected[0])]
    raw_rm = TokenRewardModel.from_pretrained(folders / "token-rm")
    assert raw_rm.prompt_format == {"chat_template": False}


def test_unsupported_combinations_are_refused(folders, tmp_path):
    tok = tiny_word_tokenizer(WORDS)
    with pytest.raises(ValueError, match="sequence reward model.*placement must be 'last'"):
        reward_from_saved_rm(folders / "seq-rm", tok, SavedRewardSettings(placement="token"))
    with pytest.raises(ValueError, match="sigmoid_baseline applies to one score"):
        reward_from_saved_rm(folders / "token-rm", tok, SavedRewardSettings(sigmoid_baseline=0.5))
    with pytest.raises(ValueError, match="placement must be"):
        reward_from_saved_rm(folders / "token-rm", tok, SavedRewardSettings(placement="middle"))
    with pytest.raises(FileNotFoundError, match="not a saved reward model"):
        reward_from_saved_rm(tmp_path / "nothing", tok)
    # A plain backbone folder (no tokencredit_reward.json) is a token RM with a zero head: allowed, scores 0.
    ScalarHeadModel.from_pretrained(folders / "backbone")
    zero = reward_from_saved_rm(folders / "backbone", tok)(["a"], [""], [[1, 2]])
    assert zero == [[0.0, 0.0]]


def test_cli_ppo_trains_on_a_reward_model_from_reward_train(tmp_path):
    backbone = save_tiny_causal_lm(tmp_path / "backbone", WORDS)
    pairs = toy_preference_pairs(32, random.Random(0))
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    for kind in ("token", "sequence"):
        assert main(["reward", "train", f"kind={kind}", f"model={backbone}", f"data={tmp_path / 'pairs.jsonl'}",
                     f"output_dir={tmp_path / kind}", "progress=false", "num_epochs=1"]) == 0
    config = {"model": str(backbone), "batch_size": 4, "mini_batch_size": 4, "num_updates": 2, "max_new_tokens": 4,
              "ppo_epochs": 1, "log_tensorboard": False, "progress": False, "lora": None}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "prompts.txt").write_text("a\nb\nc\nd\n")
    common = ["ppo", "--config", str(tmp_path / "run.yaml"), f"prompts={tmp_path / 'prompts.txt'}"]
    assert main([*common, f"reward=rm:{tmp_path / 'token' / 'model'}", f"output_dir={tmp_path / 'tppo'}"]) == 0
    assert main([*common, f"reward=rm:{tmp_path / 'sequence' / 'model'}", "reward_sigmoid_baseline=0.5",
                 f"output_dir={tmp_path / 'ser'}"]) == 0
    ser = read_metrics(tmp_path / "ser")
    assert len(ser) == 2 and all(-0.5 <= m["reward/mean"] <= 0.5 for m in ser)  # sigma(s) - 0.5
    assert main([*common, f"reward=rm:{tmp_path / 'sequence' / 'model'}", "reward_placement=token",
                 f"output_dir={tmp_path / 'bad'}"]) == 2
    assert main([*common, "reward_scale=2", f"output_dir={tmp_path / 'bad2'}"]) == 2
