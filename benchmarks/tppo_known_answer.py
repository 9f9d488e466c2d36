"""Known-answer check of TPPO's label design (issue 29): a synthetic task where each design's effect must show.

Task. A word-level vocabulary (no stopwords) and a random-init tiny Llama policy (hidden 32, 2 layers). Four
prompts "topic alpha" ... "topic delta", each with a fixed target set of 3 content words (12 target words in
all), plus 12 distractor words. A response is at most ``MAX_NEW_TOKENS`` = 6 tokens. Labels come from the real
``ReferenceLabeler(use_clicked=False)`` with context ``{"target": <the topic's 3 words>}``: a target word +1,
any other word -1 (with ``repeats="bad"`` a word repeating an earlier word of the response is -1), turned into
one label per sampled token by ``spans_to_token_labels`` and ``recipes.tppo_labels.end_label``.

    OLD design (before issue 29): repeats="keep", unit="token", end token unlabelled (0).
    NEW design:                   repeats="bad",  unit="word",  end labels on (a finished response with a +1
                                  word +1 on EOS, without one -1; a response cut at the length limit -1 on its
                                  last token).

Under OLD the best response repeats target words up to the length limit (6 x +1, never ending); under NEW it
is the 3 target words then EOS (+3 +1). Both are known in advance, so a correct pipeline must find them.

Arms (same seed, same PPO settings, same number of updates and samples):

    oracle_old  TPPO, per-token reward = OLD labels
    oracle_new  TPPO, per-token reward = NEW labels
    seq_new     sequence-level PPO, reward = sum of NEW labels on the last token
    shaped_new  TPPO on potential-based shaping, Phi(y<=t) = sigmoid(S_t / T), T = 1.5, S_t the sum of the NEW
                labels of tokens <= t (a token's word label reads only earlier words; the end label sits on the
                EOS or, for a cut response, on the token that ran into the limit, so Phi stays causal);
                r_t = Phi_t - Phi_{t-1}
    rm_old      TPPO with a token reward model trained on OLD labels of 512 samples of the start policy
    rm_new      the same with NEW labels (label_unit="word", anchor_weight=1.0)
    warm_old    diagnostic, added after P1 failed: oracle_new's run (same updates), then as many updates of TPPO on
                OLD labels from that policy, which already says its topic's words (as an SFT policy does);
                its evaluation starts (update 0) at the warm policy
    rm_new_clip    rm_new with a repeated token's reward clipped at 0 (the demo's reward_repeat=clip)
    rm_new_shaped  rm_new's model as the demo's reward_shaping=potential uses it: Phi = sigmoid(summed token
                   reward / its spread on the RM's training samples), r_t = Phi(y<=t) - Phi(y<t)
    rm_new_online  rm_new refitted every ``relabel_every`` = 50 updates on NEW labels of 256 samples of the
                   policy as it is then, plus as many replayed earlier examples (the demo's relabel_every)

The reward models use the demo's balanced BCE (``balance_labels``); the first run, without it, barely learned the
+1 class (recall 0.42 / 0.21) and its rm arms are not reported.

Measured every ``--eval-every`` updates on 64 sampled responses (16 per topic, temperature 1) and greedy per
topic: target-word F1 (distinct words vs the 3 targets), share of responses repeating a word, mean length in
tokens (EOS included), finished share, and the mean TRUE NEW-design label sum.

Predictions (mean over seeds of the final sampled evaluation; checked and printed PASS/FAIL):

    P1 oracle_old  repeats rise well above the start (repeat share >= 0.6 and >= start + 0.3) and the finished
                   share falls below the start's: the designed-in gaming issue 29 describes
    P2 oracle_new  F1 >= 0.85, repeat share <= 0.1, finished share >= 0.85, mean length in [3.5, 4.5]
    P3 shaped_new  the same optimum: F1 >= 0.85, repeat share <= 0.1
    P4 seq_new     no faster than oracle_new at the same sample budget: area under the sampled-F1 curve
                   (mean over eval points) <= oracle_new's + 0.02 (P4b, reported: final F1 >= 0.85)
    P1w warm_old   (added after P1 failed) from a policy that says its targets, OLD labels make it repeat them:
                   repeat share >= 0.6 and finished share below the start's
    P5 rm_*        rm_new repeats less than rm_old (repeat share lower) and rm_new's repeat share <= 0.2

Recorded run (3 seeds, see results/tppo_known_answer.md): P3, P4, P1w, P5a, P6 and P8 pass; P1, P2, P4b, P5 and
P7 fail. From the random start most words are -1, so ending at once is the first thing PPO learns; under OLD that
costs nothing (end unlabelled) and no seed ever finds the targets (two drift to <pad> x 6, which decodes to nothing
and earns 0), so the gaming shows only from a policy that already says its targets (warm_old: repeat share 0.01 ->
0.92). NEW's -1 on an empty answer keeps words worth trying: oracle_new finds the optimum on seed 0, 2 of 4 topics
stay at "<eos>" on seeds 1-2 (F1 0.81); shaping finds it on every seed (0.98); sequence credit learns slower (AUC
0.43 vs 0.56). With LEARNED reward models the labels alone are not enough: rm_new (held-out accuracy 0.95, +1
recall 0.97 on start samples) is gamed as much as rm_old (repeats 0.83 vs 0.67), because the start policy's samples
almost never repeat a +1 word, so "the same good word again" is extrapolation; clipping repeats halves that (0.34);
shaping the same model's rewards does not help (rm_new_shaped: 0.92, its potential rises with the repeats too);
refitting on the policy's own samples removes it (rm_new_online: repeats 0.07, true label sum +1.86 vs -3.14).

PPO settings were tuned on oracle_new seed 0 only, then fixed for every arm and seed (recorded in the JSON).

Usage (2-core CPU, one thread):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/tppo_known_answer.py --seeds 0 1 2
    python benchmarks/tppo_known_answer.py --arms oracle_new --seeds 0 --updates 60   # a quick look
    python benchmarks/tppo_known_answer.py --report                                  # tables, chart, checks

Results: ``results/tppo_known_answer.json`` (rewritten after every arm and seed; runs of the same settings
already in it are kept), ``.svg`` (sampled F1 and repeat share per arm, seed mean) and ``.md`` (final table).
The JSON records the CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from tokencredit.evaluate import svg_line_chart  # noqa: E402
from tokencredit.feedback.reference_labeler import ReferenceLabeler  # noqa: E402
from tokencredit.generation import generate  # noqa: E402
from tokencredit.recipes.tppo_labels import end_label  # noqa: E402
from tokencredit.rewards.labels import SpanLabel, spans_to_token_labels  # noqa: E402
from tokencredit.rewards.shaping import bounded, potential_reward_fn  # noqa: E402
from tokencredit.rl.ppo import PPOConfig, PPOTrainer  # noqa: E402
from tokencredit.runs import atomic_write_json  # noqa: E402
from tokencredit.testing import tiny_causal_lm, tiny_scalar_model, tiny_word_tokenizer  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from seedstats import cpu_name  # noqa: E402 - a sibling module of this script

RESULTS = HERE / "results"
OUT_JSON = RESULTS / "tppo_known_answer.json"
RUN_ROOT = Path("/tmp/known_answer")

TARGETS = {
    "alpha": ["apple", "river", "stone"],
    "beta": ["cloud", "engine", "garden"],
    "gamma": ["piano", "forest", "silver"],
    "delta": ["rocket", "violet", "harbor"],
}
DISTRACTORS = ["table", "window", "pencil", "candle", "bridge", "copper",
               "lemon", "tiger", "marble", "button", "ladder", "shadow"]
PROMPTS = [f"topic {name}" for name in TARGETS]
WORDS = ["topic", *TARGETS, *(w for ws in TARGETS.values() for w in ws), *DISTRACTORS]
MAX_NEW_TOKENS = 6
SHAPING_T = 1.5
ARMS = ("oracle_old", "oracle_new", "seq_new", "shaped_new", "rm_old", "rm_new", "warm_old", "rm_new_clip",
        "rm_new_online", "rm_new_shaped")

# Tuned on oracle_new seed 0 only, then fixed for every arm and seed. Tried there (F1 at the end): batch 32 /
# mini 16 / 4 epochs at lr 2e-3 (0.37 after 200 updates), 5e-4 (0.41 / 300), 3e-4 (0.00 / 400), 1e-3 with kl 0.02
# (0.33 / 300) or entropy 0.01 (0.00 / 300); batch 64 / mini 32 at lr 1e-3 (0.70 / 400), at 2e-3 with kl 0.05
# (0.71 / 250). Small batches let the policy settle on ending at once (label -1, far better than the start's
# ~-4) before it has sampled a topic's target words often enough; 128 samples per update fixed that.
SETTINGS = {
    "num_updates": 200,
    "batch_size": 128,
    "mini_batch_size": 64,
    "ppo_epochs": 2,
    "learning_rate": 1e-3,
    "kl_coef": 0.0,
    "entropy_coef": 0.0,
    "max_new_tokens": MAX_NEW_TOKENS,
    "temperature": 1.0,
    "eval_every": 10,
    "eval_samples_per_topic": 16,
    "shaping_temperature": SHAPING_T,
    "rm_samples": 512,
    "rm_epochs": 8,
    "rm_learning_rate": 3e-3,
    "rm_batch_size": 16,
    # the demo's reward-model setting: without it the +1 class (about 1 word in 8 from the start policy) is barely
    # learned (held-out recall of +1 tokens 0.42 / 0.21 for rm_old / rm_new in the first run)
    "rm_balance_labels": True,
    "relabel_every": 50,  # rm_new_online: updates between refits on the policy's own samples
}

DESIGNS = {
    "old": {"repeats": "keep", "unit": "token", "end": False},
    "new": {"repeats": "bad", "unit": "word", "end": True},
}


def target_of(prompt: str) -> list[str]:
    """The 3 target words of a prompt "topic <name>"."""
    return TARGETS[prompt.split()[-1]]


class Oracle:
    """Labels sampled token ids with the real labeler, aligned to the ids (one label per sampled token)."""

    def __init__(self, tok: object) -> None:
        """Keep the tokenizer and one labeler per design."""
        self.tok = tok
        self.eos = tok.eos_token_id
        self.special = set(tok.all_special_ids)
        self.labelers = {name: ReferenceLabeler(use_clicked=False, repeats=d["repeats"]) for name, d in DESIGNS.items()}

    def text_and_spans(self, prompt: str, ids: Sequence[int], design: str) -> tuple[str, list[SpanLabel], bool]:
        """The response text (special tokens dropped), its span labels, and whether it ended with EOS."""
        ids = [int(i) for i in ids]
        finished = bool(ids) and ids[-1] == self.eos
        words = [i for i in ids if i not in self.special]
        text = self.tok.decode(ids, skip_special_tokens=True)
        # The labels are computed on this text and placed back on the sampled ids: it must re-tokenize to them.
        again = list(self.tok(text, add_special_tokens=False)["input_ids"])
        assert again == words, f"alignment: {ids} -> {text!r} -> {again}"
        spans = self.labelers[design].label([prompt], [text], [{"target": " ".join(target_of(prompt))}])[0]
        return text, spans, finished

    def labels(self, prompt: str, ids: Sequence[int], design: str, ends: bool = True) -> list[int]:
        """One label per sampled token: word labels on word tokens, the end label (NEW, ``ends``) on EOS or the
        last token."""
        ids = [int(i) for i in ids]
        text, spans, finished = self.text_and_spans(prompt, ids, design)
        d = DESIGNS[design]
        _, word_labels = spans_to_token_labels(text, spans, self.tok, add_eos=False, unit=d["unit"], end_label=0)
        # A sampled <pad>/<unk> is no word: it decodes to nothing, so it carries no label (as EOS in OLD).
        positions = [k for k, i in enumerate(ids) if i not in self.special]
        assert len(positions) == len(word_labels)
        out = [0] * len(ids)
        for k, lab in zip(positions, word_labels):
            out[k] = lab
        if d["end"] and ends and ids:
            # Finished: the EOS; cut at the limit: the token that ran into it (replacing its word label), as
            # spans_to_token_labels does for a response without EOS.
            out[-1] = end_label(text, spans, finished)
        return out


def oracle_reward_fn(oracle: Oracle, design: str, kind: str) -> Callable:
    """A PPO reward_fn: per-token labels ("token") or their sum as one float per response ("sequence")."""

    def reward_fn(prompts: list[str], responses: list[str], response_token_ids: list[list[int]]) -> list:
        """Oracle labels of the sampled ids."""
        rows = []
        for prompt, text, ids in zip(prompts, responses, response_token_ids):
            assert text == oracle.tok.decode(ids, skip_special_tokens=True)
            labels = [float(v) for v in oracle.labels(prompt, ids, design)]
            assert len(labels) == len(ids)
            rows.append(labels if kind == "token" else float(sum(labels)))
        return rows

    return reward_fn


def shaped_reward_fn(oracle: Oracle, temperature: float) -> Callable:
    """TPPO reward r_t = Phi(y<=t) - Phi(y<t), Phi = sigmoid(running sum of NEW labels / temperature)."""

    def prefix_potentials(prompts: list[str], response_token_ids: list[list[int]]) -> list[list[float]]:
        """Phi of the empty prefix then of every prefix of each response."""
        out = []
        for prompt, ids in zip(prompts, response_token_ids):
            # Running sums of the full response's labels are the prefixes' own: a word's label reads only
            # earlier words, and the end label lands on the final step, which is the step that ended it.
            running, acc = [bounded(0.0, "sigmoid", temperature)], 0.0
            for lab in oracle.labels(prompt, ids, "new"):
                acc += lab
                running.append(bounded(acc, "sigmoid", temperature))
            out.append(running)
        return out

    return potential_reward_fn(prefix_potentials)


def check_causal_shaping(oracle: Oracle) -> None:
    """The NEW labels of a response's first t tokens are those of that prefix labelled alone (no end label: a
    prefix is still running), so the shaping potential of y<=t reads nothing after t."""
    tok = oracle.tok
    ids = list(tok("apple river apple table", add_special_tokens=False)["input_ids"])
    stone = tok.convert_tokens_to_ids("stone")
    for full in (ids + [tok.eos_token_id], ids + [stone, stone], ids[:3] + [tok.eos_token_id]):
        labels = oracle.labels("topic alpha", full, "new")
        for t in range(1, len(full)):
            assert labels[:t] == oracle.labels("topic alpha", full[:t], "new", ends=False), (full, t)
    assert oracle.labels("topic alpha", ids[:3] + [tok.eos_token_id], "new") == [1, 1, -1, 1]
    assert oracle.labels("topic alpha", ids + [stone, stone], "new") == [1, 1, -1, -1, 1, -1]
    assert oracle.labels("topic alpha", ids + [stone, stone], "old") == [1, 1, 1, -1, 1, 1]


def response_metrics(oracle: Oracle, prompts: Sequence[str], rows: Sequence[Sequence[int]]) -> dict:
    """F1, repeat share, length, finished share and the TRUE NEW label sum, averaged over responses."""
    tok = oracle.tok
    f1s, reps, lens, fins, sums = [], [], [], [], []
    for prompt, ids in zip(prompts, rows):
        ids = [int(i) for i in ids]
        words = [tok.convert_ids_to_tokens(i) for i in ids if i not in oracle.special]
        got, want = set(words), set(target_of(prompt))
        hit = len(got & want)
        f1s.append(0.0 if not hit else 2 * hit / (len(got) + len(want)))
        reps.append(float(len(words) != len(got)))
        lens.append(float(len(ids)))
        fins.append(float(bool(ids) and ids[-1] == oracle.eos))
        sums.append(float(sum(oracle.labels(prompt, ids, "new"))))
    mean = statistics.fmean
    return {"f1": mean(f1s), "repeat": mean(reps), "length": mean(lens), "finished": mean(fins),
            "label_sum": mean(sums)}


def evaluate(policy: torch.nn.Module, oracle: Oracle, seed: int, update: int) -> dict:
    """Sampled (16 per topic, temperature 1) and greedy metrics of the policy now."""
    n = SETTINGS["eval_samples_per_topic"]
    prompts = [p for p in PROMPTS for _ in range(n)]
    # Its own stream: evaluation must not move the trainer's sampling generator.
    gen = torch.Generator().manual_seed(10_000 + seed)
    sampled = generate(policy, oracle.tok, prompts, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, generator=gen)
    greedy = generate(policy, oracle.tok, PROMPTS, max_new_tokens=MAX_NEW_TOKENS, greedy=True)
    out = {"update": update, "sampled": response_metrics(oracle, prompts, sampled.token_ids()),
           "greedy": response_metrics(oracle, PROMPTS, greedy.token_ids())}
    out["greedy_text"] = {p: oracle.tok.decode(ids) for p, ids in zip(PROMPTS, greedy.token_ids())}
    return out


def rm_examples(oracle: Oracle, policy: torch.nn.Module, design: str, n: int, gen_seed: int) -> list:
    """``n`` samples of ``policy`` (the topics in turn) labelled with ``design`` labels, as TokenExamples."""
    from tokencredit.rewards.records import TokenExample

    prompts = [PROMPTS[k % len(PROMPTS)] for k in range(n)]
    gen = torch.Generator().manual_seed(gen_seed)
    rows = generate(policy, oracle.tok, prompts, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0,
                    generator=gen).token_ids()
    d = DESIGNS[design]
    examples = []
    for prompt, ids in zip(prompts, rows):
        text, spans, finished = oracle.text_and_spans(prompt, ids, design)
        if not text and not finished:
            continue  # only <pad>/<unk> up to the limit: no text to read
        end = end_label(text, spans, finished) if d["end"] else 0
        examples.append(TokenExample(prompt, text, spans, finished=finished, end_label=end))
    return examples


def fit_rm(rm: object, examples: list, design: str, seed: int, folder: Path) -> dict:
    """Train ``rm`` in place on token examples with the demo's reward-model loss settings; returns its eval."""
    from tokencredit.rewards.token_rm_training import TokenRMConfig, train_token_reward_model

    shutil.rmtree(folder, ignore_errors=True)
    cfg = TokenRMConfig(output_dir=str(folder), seed=seed, num_epochs=SETTINGS["rm_epochs"],
                        batch_size=SETTINGS["rm_batch_size"], learning_rate=SETTINGS["rm_learning_rate"],
                        label_unit=DESIGNS[design]["unit"], anchor_weight=1.0 if design == "new" else 0.0,
                        balance_labels=SETTINGS["rm_balance_labels"],
                        mixed_precision="no", progress=False, device="cpu")
    history = train_token_reward_model(rm, cfg, token_examples=examples, pairs=[])
    rm.model.eval()
    return dict(history[-1]["eval"], examples=len(examples))


def train_rm(oracle: Oracle, policy: torch.nn.Module, design: str, seed: int) -> tuple[object, dict, list]:
    """A token reward model trained on ``design`` labels of samples from the start policy; returns it, its eval
    and its training examples."""
    from tokencredit.rewards.token_rm import TokenRewardModel

    examples = rm_examples(oracle, policy, design, SETTINGS["rm_samples"], 20_000 + seed)
    rm = TokenRewardModel.from_model(tiny_scalar_model(len(oracle.tok), seed=seed, hidden_size=32), oracle.tok)
    return rm, fit_rm(rm, examples, design, seed, RUN_ROOT / f"rm_{design}_s{seed}"), examples


def online_refit(oracle: Oracle, rm: object, policy: torch.nn.Module, seen: list, seed: int, k: int) -> dict:
    """Round k of online relabelling: NEW labels of the policy's own samples, the reward model trained further on
    them plus as many replayed earlier examples (the demo's relabel_every, in miniature)."""
    import random

    new = rm_examples(oracle, policy, "new", SETTINGS["rm_samples"] // 2, 30_000 + 100 * seed + k)
    replay = random.Random(100 * seed + k).sample(seen, min(len(seen), len(new)))
    info = fit_rm(rm, new + replay, "new", seed + k, RUN_ROOT / f"rm_online_s{seed}_r{k}")
    seen.extend(new)
    return info


def make_trainer(folder: Path, seed: int, updates: int, policy: torch.nn.Module, tok: object,
                 reward_fn: Callable) -> PPOTrainer:
    """A PPO trainer with the fixed settings (the same for every arm)."""
    shutil.rmtree(folder, ignore_errors=True)
    cfg = PPOConfig(output_dir=str(folder), seed=seed, num_updates=updates, batch_size=SETTINGS["batch_size"],
                    mini_batch_size=SETTINGS["mini_batch_size"], ppo_epochs=SETTINGS["ppo_epochs"],
                    learning_rate=SETTINGS["learning_rate"], kl_coef=SETTINGS["kl_coef"],
                    entropy_coef=SETTINGS["entropy_coef"],
                    max_new_tokens=MAX_NEW_TOKENS, temperature=SETTINGS["temperature"], save_every=updates,
                    log_tensorboard=False, progress=False, mixed_precision="no", device="cpu")
    # Every topic once per 4 rows, so each batch covers all topics equally often.
    return PPOTrainer(cfg, policy=policy, tokenizer=tok, prompts=PROMPTS * (SETTINGS["batch_size"] // 4),
                      reward_fn=reward_fn)


def run_arm(arm: str, seed: int, updates: int, on_eval: Callable[[dict], None]) -> dict:
    """Train one arm for one seed, evaluating every eval_every updates; returns its record."""
    torch.manual_seed(seed)
    tok = tiny_word_tokenizer(WORDS)
    oracle = Oracle(tok)
    policy = tiny_causal_lm(len(tok), seed=seed, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    record: dict = {"arm": arm, "seed": seed, "evals": []}
    t0 = time.perf_counter()
    if arm.startswith("oracle_"):
        reward_fn = oracle_reward_fn(oracle, arm.split("_")[1], "token")
    elif arm == "seq_new":
        reward_fn = oracle_reward_fn(oracle, "new", "sequence")
    elif arm == "shaped_new":
        reward_fn = shaped_reward_fn(oracle, SETTINGS["shaping_temperature"])
    elif arm.startswith("rm_"):
        rm, record["rm_eval"], seen = train_rm(oracle, policy, arm.split("_")[1], seed)
        record["rm_time_s"] = time.perf_counter() - t0
        reward_fn = rm.as_reward_fn("token", repeats="clip" if arm == "rm_new_clip" else "keep")
        if arm == "rm_new_shaped":
            # The demo's shaping: Phi = sigmoid(summed token reward / its spread on the RM's training samples).
            from tokencredit.recipes.tppo import _sum_spread
            from tokencredit.rewards.shaping import token_rm_potentials

            spread = _sum_spread(rm.score([e.prompt for e in seen], [e.response for e in seen]))
            record["shaping_temperature"] = spread
            reward_fn = potential_reward_fn(token_rm_potentials(rm, bound="sigmoid", temperature=spread))
    elif arm == "warm_old":
        # A policy that already says on-topic words (as an SFT model does): oracle_new's run, then OLD labels.
        warm = make_trainer(RUN_ROOT / f"{arm}_warmup_s{seed}", seed, updates, policy, tok,
                            oracle_reward_fn(oracle, "new", "token"))
        while warm.update_idx < updates:
            warm.step(warm.batch_indices(warm.update_idx))
            warm.update_idx += 1
        policy = warm.policy
        record["warmup_s"] = time.perf_counter() - t0
        reward_fn = oracle_reward_fn(oracle, "old", "token")
    else:
        raise ValueError(f"unknown arm {arm!r}; pick from {ARMS}")
    trainer = make_trainer(RUN_ROOT / f"{arm}_s{seed}", seed, updates, policy, tok, reward_fn)
    record["evals"].append(evaluate(trainer.policy, oracle, seed, 0))
    on_eval(record)
    train_rewards = []
    # Stepping the trainer directly (what train() loops over) lets us evaluate mid-run without checkpoints.
    every = SETTINGS["relabel_every"]
    while trainer.update_idx < updates:
        if arm == "rm_new_online" and trainer.update_idx and trainer.update_idx % every == 0:
            record.setdefault("rounds", []).append(
                online_refit(oracle, rm, trainer.policy, seen, seed, trainer.update_idx // every))
            trainer.reward_fn = rm.as_reward_fn("token", repeats="keep")
        stats = trainer.step(trainer.batch_indices(trainer.update_idx))
        trainer.update_idx += 1
        train_rewards.append(stats.get("reward/mean"))
        if trainer.update_idx % SETTINGS["eval_every"] == 0 or trainer.update_idx == updates:
            record["evals"].append(evaluate(trainer.policy, oracle, seed, trainer.update_idx))
            record["time_s"] = time.perf_counter() - t0
            record["train_reward"] = train_rewards
            on_eval(record)
            s = record["evals"][-1]["sampled"]
            print(f"  {arm} s{seed} u{trainer.update_idx:4d}  f1 {s['f1']:.2f} rep {s['repeat']:.2f} "
                  f"len {s['length']:.2f} fin {s['finished']:.2f} sum {s['label_sum']:+.2f}  "
                  f"greedy {record['evals'][-1]['greedy_text']}  ({record['time_s']:.0f}s)", flush=True)
    record["time_s"] = time.perf_counter() - t0
    record["done"] = True
    return record


# ---------------------------------------------------------------------- summary, predictions, report
def final(record: dict, key: str, kind: str = "sampled") -> float:
    """The last evaluation's metric."""
    return record["evals"][-1][kind][key]


def auc(record: dict) -> float:
    """Mean sampled F1 over the evaluation points (start excluded): area under the learning curve."""
    points = [e["sampled"]["f1"] for e in record["evals"][1:]]
    return statistics.fmean(points) if points else float("nan")


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = list(values)
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: dict) -> dict:
    """Per arm: mean and sd over finished seeds of the final metrics, AUC and run time."""
    out = {}
    for arm, by_seed in runs.items():
        recs = [r for r in by_seed.values() if r.get("done")]
        if not recs:
            continue
        row: dict = {"seeds": sorted(r["seed"] for r in recs)}
        for kind in ("sampled", "greedy"):
            for key in ("f1", "repeat", "length", "finished", "label_sum"):
                row[f"{kind}_{key}"] = mean_sd([final(r, key, kind) for r in recs])
        for key in ("repeat", "finished", "f1"):
            row[f"start_{key}"] = mean_sd([r["evals"][0]["sampled"][key] for r in recs])
        row["auc_f1"] = mean_sd([auc(r) for r in recs])
        row["time_s"] = mean_sd([r["time_s"] for r in recs])
        if all("rm_eval" in r for r in recs):
            for key in ("token_accuracy", "token_recall", "token_bad_recall"):
                # None when the model never called a token good (precision) or there was none: nan, not 0
                row[f"rm_{key}"] = mean_sd([float("nan") if r["rm_eval"][key] is None else r["rm_eval"][key]
                                            for r in recs])
        out[arm] = row
    return out


def predictions(summary: dict) -> list[dict]:
    """Check the docstring's predictions on the summary; a prediction whose arms did not run is "skipped"."""

    def m(arm: str, key: str) -> float:
        return summary[arm][key][0]

    checks: list[tuple[str, list[str], Callable[[], tuple[bool, str]]]] = [
        ("P1 oracle_old games the OLD labels: repeats rise (>= 0.6 and >= start + 0.3), finished share falls",
         ["oracle_old"], lambda: (
             m("oracle_old", "sampled_repeat") >= max(0.6, m("oracle_old", "start_repeat") + 0.3)
             and m("oracle_old", "sampled_finished") < m("oracle_old", "start_finished"),
             f"repeat {m('oracle_old', 'start_repeat'):.2f} -> {m('oracle_old', 'sampled_repeat'):.2f}, finished "
             f"{m('oracle_old', 'start_finished'):.2f} -> {m('oracle_old', 'sampled_finished'):.2f}")),
        ("P2 oracle_new finds the optimum: F1 >= 0.85, repeat <= 0.1, finished >= 0.85, length in [3.5, 4.5]",
         ["oracle_new"], lambda: (
             m("oracle_new", "sampled_f1") >= 0.85 and m("oracle_new", "sampled_repeat") <= 0.1
             and m("oracle_new", "sampled_finished") >= 0.85 and 3.5 <= m("oracle_new", "sampled_length") <= 4.5,
             _line(summary, "oracle_new"))),
        ("P3 shaped_new finds the same optimum: F1 >= 0.85, repeat <= 0.1",
         ["shaped_new"], lambda: (
             m("shaped_new", "sampled_f1") >= 0.85 and m("shaped_new", "sampled_repeat") <= 0.1,
             _line(summary, "shaped_new"))),
        ("P4 seq_new learns no faster than oracle_new: AUC(F1) <= oracle_new's + 0.02",
         ["seq_new", "oracle_new"], lambda: (
             m("seq_new", "auc_f1") <= m("oracle_new", "auc_f1") + 0.02,
             f"AUC seq_new {m('seq_new', 'auc_f1'):.3f} vs oracle_new {m('oracle_new', 'auc_f1'):.3f}")),
        ("P4b seq_new reaches the optimum within the budget: final F1 >= 0.85",
         ["seq_new"], lambda: (m("seq_new", "sampled_f1") >= 0.85, _line(summary, "seq_new"))),
        ("P1w (added after P1 failed) warm_old: from oracle_new's policy, OLD labels make it repeat (>= 0.6) "
         "and end less", ["warm_old"], lambda: (
             m("warm_old", "sampled_repeat") >= 0.6
             and m("warm_old", "sampled_finished") < m("warm_old", "start_finished"),
             f"repeat {m('warm_old', 'start_repeat'):.2f} -> {m('warm_old', 'sampled_repeat'):.2f}, finished "
             f"{m('warm_old', 'start_finished'):.2f} -> {m('warm_old', 'sampled_finished'):.2f}")),
        ("P5 rm_new repeats less than rm_old, and rm_new's repeat share <= 0.2",
         ["rm_old", "rm_new"], lambda: (
             m("rm_new", "sampled_repeat") < m("rm_old", "sampled_repeat") and m("rm_new", "sampled_repeat") <= 0.2,
             f"repeat rm_old {m('rm_old', 'sampled_repeat'):.2f}, rm_new {m('rm_new', 'sampled_repeat'):.2f}")),
        # Written before the second run (balanced reward-model labels, online and clip arms):
        ("P5a rm_old: a reward model learned from OLD labels is gamed like the labels: repeat share >= 0.6",
         ["rm_old"], lambda: (m("rm_old", "sampled_repeat") >= 0.6, _line(summary, "rm_old"))),
        ("P6 rm_new_online: refits on the policy's own samples cut repeats vs rm_new (by >= 0.2) and raise the "
         "true NEW label sum", ["rm_new", "rm_new_online"], lambda: (
             m("rm_new_online", "sampled_repeat") <= m("rm_new", "sampled_repeat") - 0.2
             and m("rm_new_online", "sampled_label_sum") > m("rm_new", "sampled_label_sum"),
             f"repeat rm_new {m('rm_new', 'sampled_repeat'):.2f} vs online {m('rm_new_online', 'sampled_repeat'):.2f}"
             f"; label sum {m('rm_new', 'sampled_label_sum'):+.2f} vs {m('rm_new_online', 'sampled_label_sum'):+.2f}")),
        ("P8 rm_new_shaped: shaping bounds the total but reads the same model, so it does not undo the model's "
         "extrapolation: repeat share >= 0.3 (written before its run)", ["rm_new_shaped"], lambda: (
             m("rm_new_shaped", "sampled_repeat") >= 0.3, _line(summary, "rm_new_shaped"))),
        ("P7 rm_new_clip: clipping repeated tokens' reward at 0 (the demo's reward_repeat=clip): repeat share <= 0.2",
         ["rm_new_clip"], lambda: (m("rm_new_clip", "sampled_repeat") <= 0.2, _line(summary, "rm_new_clip"))),
    ]
    out = []
    for name, arms, check in checks:
        if not all(a in summary for a in arms):
            out.append({"prediction": name, "result": "skipped", "detail": f"needs {arms}"})
            continue
        ok, detail = check()
        out.append({"prediction": name, "result": "PASS" if ok else "FAIL", "detail": detail})
    return out


def _line(summary: dict, arm: str) -> str:
    """The final sampled metrics of an arm on one line."""
    s = summary[arm]
    return (f"F1 {s['sampled_f1'][0]:.2f}, repeat {s['sampled_repeat'][0]:.2f}, finished "
            f"{s['sampled_finished'][0]:.2f}, length {s['sampled_length'][0]:.2f}")


def write_report(data: dict) -> None:
    """Chart (.svg) and table (.md) from the results."""
    summary = data.get("summary", {})
    series_f1, series_rep = {}, {}
    for arm, by_seed in data["runs"].items():
        recs = [r for r in by_seed.values() if r.get("done")]
        if not recs:
            continue
        n = min(len(r["evals"]) for r in recs)
        series_f1[f"{arm} F1"] = [statistics.fmean(r["evals"][k]["sampled"]["f1"] for r in recs) for k in range(n)]
        series_rep[f"{arm} repeat"] = [statistics.fmean(r["evals"][k]["sampled"]["repeat"] for r in recs)
                                       for k in range(n)]
    every = data["settings"]["eval_every"]
    xlabel = f"evaluation (every {every} PPO updates; 1 = start)"
    svg_f1 = svg_line_chart(series_f1, "Known answer: sampled target-word F1 (mean over seeds)", xlabel=xlabel,
                            ylabel="F1", width=720, height=300)
    svg_rep = svg_line_chart(series_rep, "Known answer: share of responses repeating a word", xlabel=xlabel,
                             ylabel="repeat share", width=720, height=300)
    # Two charts stacked in one file.
    body = [s.split(">", 1)[1].rsplit("</svg>", 1)[0] for s in (svg_f1, svg_rep)]
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="720" height="600" viewBox="0 0 720 600">'
           f'<g>{body[0]}</g><g transform="translate(0,300)">{body[1]}</g></svg>\n')
    (RESULTS / "tppo_known_answer.svg").write_text(svg)

    def ms(row: dict, key: str, digits: int = 2) -> str:
        mu, sd = row[key]
        return f"{mu:.{digits}f} ± {sd:.{digits}f}"

    lines = [
        "# TPPO known-answer check (issue 29)",
        "",
        f"`benchmarks/tppo_known_answer.py`, {data['settings']['num_updates']} PPO updates of "
        f"{data['settings']['batch_size']} samples per arm and seed, final evaluation on 64 sampled responses "
        f"(temperature 1); mean ± sd over seeds. CPU: {data.get('cpu', '?')}, one thread.",
        "",
        "| arm | seeds | F1 | repeat share | length (tokens) | finished | NEW label sum | greedy F1 | AUC F1 "
        "| time / seed (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        if arm not in summary:
            continue
        r = summary[arm]
        lines.append(f"| {arm} | {len(r['seeds'])} | {ms(r, 'sampled_f1')} | {ms(r, 'sampled_repeat')} | "
                     f"{ms(r, 'sampled_length')} | {ms(r, 'sampled_finished')} | {ms(r, 'sampled_label_sum')} | "
                     f"{ms(r, 'greedy_f1')} | {ms(r, 'auc_f1', 3)} | {ms(r, 'time_s', 0)} |")
    if any(a in summary for a in ("oracle_old", "oracle_new")):
        start = summary.get("oracle_new") or summary["oracle_old"]
        lines += ["", f"Start policy (random init): F1 {ms(start, 'start_f1')}, repeat share "
                  f"{ms(start, 'start_repeat')}, finished {ms(start, 'start_finished')}."]
    rm_rows = [a for a in ("rm_old", "rm_new") if a in summary and "rm_token_accuracy" in summary[a]]
    if rm_rows:
        lines += ["", "Reward model on its held-out labelled tokens (most of them -1, so accuracy alone flatters it): "
                  + "; ".join(f"{a} accuracy {ms(summary[a], 'rm_token_accuracy', 3)}, recall of +1 tokens "
                              f"{ms(summary[a], 'rm_token_recall', 3)}, recall of -1 tokens "
                              f"{ms(summary[a], 'rm_token_bad_recall', 3)}" for a in rm_rows) + "."]
    lines += ["", "| prediction | result | detail |", "|---|---|---|"]
    lines += [f"| {p['prediction']} | {p['result']} | {p['detail']} |" for p in data.get("predictions", [])]
    lines += ["", "Settings: `" + json.dumps(data["settings"]) + "`", ""]
    (RESULTS / "tppo_known_answer.md").write_text("\n".join(lines))



def save(data: dict) -> None:
    """Summary, predictions and the JSON file, written atomically."""
    data["summary"] = summarize(data["runs"])
    data["predictions"] = predictions(data["summary"])
    atomic_write_json(OUT_JSON, data)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the arms and seeds asked for, then write results, chart and table and print the checks."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--updates", type=int, default=SETTINGS["num_updates"])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override a setting (tuning only; the results file records the settings used)")
    p.add_argument("--report", action="store_true", help="only rewrite summary, chart and table from the JSON")
    p.add_argument("--fresh", action="store_true", help="drop runs already in the results file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for item in args.set:
        key, value = item.split("=", 1)
        if key not in SETTINGS:
            p.error(f"unknown setting {key!r}")
        SETTINGS[key] = type(SETTINGS[key])(value)
    settings = dict(SETTINGS, num_updates=args.updates)
    data = {"settings": settings, "cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "runs": {}}
    if OUT_JSON.exists() and not args.fresh:
        old = json.loads(OUT_JSON.read_text())
        # Runs of other settings are not comparable: keep only runs made with exactly these.
        if old.get("settings") == settings or args.report:
            data = old if args.report else dict(data, runs=old.get("runs", {}))
    if not args.report:
        check_causal_shaping(Oracle(tiny_word_tokenizer(WORDS)))
        RUN_ROOT.mkdir(parents=True, exist_ok=True)
        for arm in args.arms:
            for seed in args.seeds:
                print(f"== {arm} seed {seed}", flush=True)

                def on_eval(record: dict, arm: str = arm, seed: int = seed) -> None:
                    data["runs"].setdefault(arm, {})[str(seed)] = record
                    save(data)

                on_eval(run_arm(arm, seed, args.updates, on_eval))
    save(data)
    write_report(data)
    for pred in data["predictions"]:
        print(f"{pred['result']:7s} {pred['prediction']}  [{pred['detail']}]")
    for arm, row in data["summary"].items():
        print(f"{arm:11s} {_line(data['summary'], arm)}, AUC {row['auc_f1'][0]:.3f}, {row['time_s'][0]:.0f}s/seed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
