"""FG on real text: does fine-grained PPO (token RM from minimal edits) beat sequence-level PPO at equal budget?

Task: IMDB review continuation (`../shared/data/imdb`). Prompt = the first words of a review; the policy
(SmolLM2-135M-Instruct, LoRA on its top blocks) writes the next words.

- Minimal edits (the feedback): the real continuation of a test-split review is the original answer; every word
  that the VADER sentiment lexicon scores negative is replaced by a positive word. The diff gives real
  token-level feedback: -1 on the words the edit removed, +1 on the words it wrote.
- Reward models (`tokencredit fg`, same backbone, seed, epochs and pairs): a token RM with FG's hybrid loss and
  a sequence RM (Bradley-Terry on (edited, original)); both scored on held-out edits.
- PPO: fine-grained (token RM at every token) vs sequence-level (sequence RM on the last token), the same start,
  seed, KL and number of samples.
- Gold scorer, which neither policy nor the edit maker used: a bag-of-words logistic regression trained here (in
  numpy) on the IMDB *train* split's labels; its score is P(positive) of an answer. Guards against reward
  hacking: mean length and distinct-1/2 of the answers.
- Upper-reference checks before any policy number is read: the gold classifier's accuracy on IMDB test
  reviews, how often it prefers the edited over the original answer of held-out edits, and both RMs' held-out
  pair accuracy.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fg_policy.py                 # 3 seeds, ~60 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fg_policy.py --smoke         # tiny budgets, checks plumbing
    # the same SFT and RMs, PPO again with a stronger KL penalty:
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fg_policy.py --stages-from runs/bench-fg-policy \
        --output runs/bench-fg-policy-kl02 --results benchmarks/results/fg_policy_kl02.json kl_coef=0.2

Results go to `benchmarks/results/fg_policy.json` after every seed, a chart to `fg_policy.svg`, and a
side-by-side table is printed. The edit maker is vaderSentiment's lexicon (a project dependency; offline).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from tokencredit.recipes.fg import FGConfig, run_fg

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imdb"
RESULTS = Path(__file__).parent / "results"
WORD = re.compile(r"[a-z][a-z']*")
# Written in place of a word the lexicon dislikes; picked by the word's length so the edit is deterministic.
POSITIVE = ("good", "fine", "great", "nice", "solid", "fun", "lovely", "decent")
POLICIES = ("sft", "fine_grained", "sequence")


def clean(text: str) -> str:
    """Review text without HTML line breaks and runs of spaces."""
    return " ".join(text.replace("<br />", " ").split())


def read_reviews(name: str) -> list[dict]:
    """Rows {text, label} of imdb/<name>.jsonl."""
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().split("\n") if line.strip()]


# --------------------------------------------------------------------------------------------- gold scorer
class BagOfWordsSentiment:
    """Logistic regression on word presence, trained by full-batch gradient descent; P(positive) of a text."""

    def __init__(self, reviews: list[dict], vocab_size: int = 6000, l2: float = 1e-3, steps: int = 400) -> None:
        """Fit on reviews {text, label}."""
        counts = Counter(w for r in reviews for w in set(WORD.findall(clean(r["text"]).lower())))
        self.vocab = {w: i for i, (w, c) in enumerate(counts.most_common(vocab_size)) if c >= 3}
        x = self._features([r["text"] for r in reviews])
        y = np.array([float(r["label"]) for r in reviews])
        self.w, self.b = np.zeros(x.shape[1]), 0.0
        lr = 0.5
        for _ in range(steps):
            p = 1 / (1 + np.exp(-(x @ self.w + self.b)))
            self.w -= lr * (x.T @ (p - y) / len(y) + l2 * self.w)
            self.b -= lr * float(np.mean(p - y))

    def _features(self, texts: list[str]) -> np.ndarray:
        """Binary word presence, scaled by 1/sqrt(words) so short answers and long reviews are comparable."""
        x = np.zeros((len(texts), len(self.vocab)))
        for i, text in enumerate(texts):
            ids = {self.vocab[w] for w in WORD.findall(clean(text).lower()) if w in self.vocab}
            if ids:
                x[i, list(ids)] = 1 / np.sqrt(len(ids))
        return x

    def proba(self, texts: list[str]) -> list[float]:
        """P(positive) of each text."""
        return (1 / (1 + np.exp(-(self._features(texts) @ self.w + self.b)))).tolist()

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        """The gold score of an answer: P(positive) of the answer alone."""
        return self.proba(responses)


class ContextualSentiment:
    """A MiniLM encoder fine-tuned on IMDB *train* labels: P(positive) of a short text, words read in context.

    It learns from human review labels, not from the lexicon that makes the edits, and it reads whole snippets
    (so "not bad" or a positive word dropped into a negative sentence is judged as a reader would), unlike the
    bag-of-words scorer, which sums per-word weights and so rewards exactly what a lexicon-driven edit inserts.
    Trained on windows of the length of the policy's answers, labelled by their review's label (noisy: a window
    of a positive review can be negative, which caps its window accuracy below its review accuracy).
    """

    def __init__(self, model: torch.nn.Module, head: torch.nn.Linear, tokenizer: object, max_tokens: int) -> None:
        """A fitted encoder and head (see `fit` and `load`)."""
        self.model, self.head, self.tokenizer, self.max_tokens = model.eval(), head.eval(), tokenizer, max_tokens

    @staticmethod
    def windows(reviews: list[dict], words: int, per_review: int, seed: int) -> list[tuple[str, int]]:
        """(snippet, label): `per_review` random windows of `words` words from each review."""
        rng = random.Random(seed)
        out = []
        for r in reviews:
            tokens = clean(r["text"]).split()
            for _ in range(per_review):
                start = rng.randrange(max(len(tokens) - words, 0) + 1)
                out.append((" ".join(tokens[start : start + words]), int(r["label"])))
        return out

    @classmethod
    def fit(cls, reviews: list[dict], words: int, epochs: int = 2, per_review: int = 2, lr: float = 5e-5,
            batch: int = 32, seed: int = 0, max_tokens: int = 64) -> ContextualSentiment:
        """Fine-tune all-MiniLM-L6-v2 (mean-pooled, one linear head) on review windows with BCE."""
        from transformers import AutoModel, AutoTokenizer

        from tokencredit.models import resolve_model

        torch.manual_seed(seed)
        folder = resolve_model("all-minilm-l6-v2")
        tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder)
        head = torch.nn.Linear(model.config.hidden_size, 1)
        rows = cls.windows(reviews, words, per_review, seed)
        params = [*model.parameters(), *head.parameters()]
        optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        steps = epochs * ((len(rows) + batch - 1) // batch)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda i: min(1.0, (i + 1) / (0.1 * steps))
                                                  * max(0.0, (steps - i) / steps))
        rng = random.Random(seed)
        scorer = cls(model, head, tokenizer, max_tokens)
        model.train()
        for epoch in range(epochs):
            rng.shuffle(rows)
            for i in range(0, len(rows), batch):
                part = rows[i : i + batch]
                logits = scorer._logits([t for t, _ in part])
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, torch.tensor([float(y) for _, y in part]))
                optim.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optim.step()
                sched.step()
            print(f"contextual gold: epoch {epoch + 1}/{epochs} done (last loss {loss.item():.3f})", flush=True)
        model.eval()
        return scorer

    def _logits(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled encoder states through the head, one logit per text."""
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        states = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
        return self.head((states * mask).sum(1) / mask.sum(1).clamp(min=1)).squeeze(-1)

    def proba(self, texts: list[str], batch: int = 64) -> list[float]:
        """P(positive) of each text."""
        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(texts), batch):
                out += torch.sigmoid(self._logits([t if t.strip() else "." for t in texts[i : i + batch]])).tolist()
        return out

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        """The gold score of an answer: P(positive) of the answer alone."""
        return self.proba(responses)

    def save(self, path: Path) -> None:
        """Weights as safetensors (loading them runs no code)."""
        from safetensors.torch import save_file

        state = {f"model.{k}": v.contiguous() for k, v in self.model.state_dict().items()}
        state.update({f"head.{k}": v.contiguous() for k, v in self.head.state_dict().items()})
        save_file(state, str(path), metadata={"max_tokens": str(self.max_tokens)})

    @classmethod
    def load(cls, path: Path) -> ContextualSentiment:
        """A scorer saved by `save`, on the installed MiniLM's config and tokenizer."""
        from safetensors import safe_open
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from tokencredit.models import resolve_model

        folder = resolve_model("all-minilm-l6-v2")
        model = AutoModel.from_config(AutoConfig.from_pretrained(folder))
        head = torch.nn.Linear(model.config.hidden_size, 1)
        state = load_file(str(path))
        model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        with safe_open(str(path), "pt") as f:
            max_tokens = int(f.metadata()["max_tokens"])
        return cls(model, head, AutoTokenizer.from_pretrained(folder), max_tokens)


def contextual_gold(train: list[dict], test: list[dict], words: int, cache: Path, smoke: bool = False) -> tuple[
        ContextualSentiment, dict]:
    """The contextual gold scorer, fitted once and cached in `cache` (its accuracy beside it)."""
    info_path = cache.with_suffix(".json")
    if cache.exists() and info_path.exists():
        return ContextualSentiment.load(cache), json.loads(info_path.read_text())
    t0 = time.time()
    reviews = train[:64] if smoke else train
    gold = ContextualSentiment.fit(reviews, words, epochs=1 if smoke else 2)
    held = test[:64] if smoke else test
    snippets = ContextualSentiment.windows(held, words, 1, seed=1)
    p_snip = gold.proba([t for t, _ in snippets])
    # a whole review is judged by the mean over its windows (the scorer reads at most max_tokens)
    review_windows = ContextualSentiment.windows(held, words, 4, seed=2)
    p_rev = np.array(gold.proba([t for t, _ in review_windows])).reshape(len(held), 4).mean(1)
    info = {"kind": "all-MiniLM-L6-v2 fine-tuned on windows of imdb/train reviews (their review labels)",
            "train_reviews": len(reviews), "window_words": words,
            "window_accuracy": float(np.mean([(p > 0.5) == bool(y) for p, (_, y) in zip(p_snip, snippets)])),
            "review_accuracy": float(np.mean([(p > 0.5) == bool(r["label"]) for p, r in zip(p_rev, held)])),
            "fit_minutes": round((time.time() - t0) / 60, 1)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    gold.save(cache)
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    return gold, info


# ---------------------------------------------------------------------------------------------- edit maker
def negative_words() -> dict[str, float]:
    """VADER's lexicon entries with a negative valence (<= -1.0)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        sys.exit("fg_policy.py needs the VADER lexicon: pip install vaderSentiment")
    return {w: v for w, v in SentimentIntensityAnalyzer().lexicon.items() if v <= -1.0 and w.isalpha()}


def make_edits(reviews: list[dict], prompt_words: int, answer_words: int, lexicon: dict[str, float]) -> list[dict]:
    """{prompt, original, edited}: the review's next words, and the same with every disliked word replaced."""
    edits = []
    for r in reviews:
        words = clean(r["text"]).split()
        if len(words) < prompt_words + answer_words:
            continue
        prompt = " ".join(words[:prompt_words])
        original = words[prompt_words : prompt_words + answer_words]
        edited = []
        for w in original:
            core = w.strip(".,!?;:\"'()").lower()
            if core in lexicon:
                new = POSITIVE[len(core) % len(POSITIVE)]
                w = w.lower().replace(core, new, 1)
            edited.append(w)
        if edited != original:
            edits.append({"prompt": prompt, "original": " ".join(original), "edited": " ".join(edited)})
    return edits


# ------------------------------------------------------------------------------------------------- running
def summarize(per_seed: dict) -> dict:
    """Mean and std over seeds of every policy metric, RM accuracy and check."""
    def stat(values: list[float]) -> dict:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values}

    runs = list(per_seed.values())
    out: dict = {"policies": {}, "reward_models": {}}
    for name in POLICIES:
        keys = runs[0]["policies"][name].keys()
        out["policies"][name] = {k: stat([r["policies"][name][k] for r in runs]) for k in keys}
    for rm in ("token_rm", "sequence_rm"):
        out["reward_models"][rm] = stat([r["reward_models"][rm]["pair_accuracy"] for r in runs])
    out["gold_edited_preferred"] = stat([r["gold_on_heldout_edits"]["edited_preferred"] for r in runs])
    gaps = [r["policies"]["fine_grained"]["gold"] - r["policies"]["sequence"]["gold"] for r in runs]
    out["gold_gap_fine_minus_sequence"] = {**stat(gaps), "fine_grained_wins": sum(g > 0 for g in gaps)}
    return out


def write_chart(result: dict, path: Path) -> None:
    """Bars of mean gold score per policy, a dot per seed; distinct-1 (a degeneration check) beside the name."""
    from tokencredit.evaluate import svg_bar_chart

    agg = result["summary"]["policies"]
    bars = {f"{p} (distinct-1 {agg[p]['distinct_1']['mean']:.2f})": agg[p]["gold"]["values"] for p in POLICIES}
    path.write_text(svg_bar_chart({"IMDB continuation": bars}, "gold P(positive) on held-out prompts (mean over "
                                  "seeds, dots = seeds)", "gold") + "\n")


def print_table(result: dict) -> None:
    """Side-by-side table of the policies (mean +- std over seeds)."""
    agg = result["summary"]["policies"]
    cols = ("gold", "token_rm_reward", "sequence_rm_reward", "mean_length_tokens", "distinct_1", "distinct_2")
    print("| policy | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name in POLICIES:
        cells = [f"{agg[name][c]['mean']:.3f} ± {agg[name][c]['std']:.3f}" for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")
    s = result["summary"]
    info = result["gold_classifier"]
    accuracy = info.get("test_accuracy", info.get("review_accuracy"))
    print(f"gold classifier accuracy on IMDB test reviews: {accuracy:.3f}; "
          f"prefers edited over original on held-out edits: {s['gold_edited_preferred']['mean']:.3f}")
    for rm in ("token_rm", "sequence_rm"):
        acc = s["reward_models"][rm]
        print(f"{rm} held-out pair accuracy: {acc['mean']:.3f} ± {acc['std']:.3f}")
    gap = s["gold_gap_fine_minus_sequence"]
    print(f"gold gap fine_grained - sequence: {gap['mean']:+.4f} ± {gap['std']:.4f} "
          f"(fine-grained ahead in {gap['fine_grained_wins']}/{len(gap['values'])} seeds)")


def main() -> int:
    """Build the edits and the gold scorer, run `fg` once per seed, write results as they arrive."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--edits", type=int, default=300, help="minimal edits made (20%% held out per seed)")
    parser.add_argument("--prompt-words", type=int, default=12)
    parser.add_argument("--answer-words", type=int, default=16)
    parser.add_argument("--output", default="runs/bench-fg-policy")
    parser.add_argument("--results", default=str(RESULTS / "fg_policy.json"))
    parser.add_argument("--smoke", action="store_true", help="tiny random models and budgets: checks plumbing")
    parser.add_argument("--stages-from", help="an earlier --output: reuse its SFT and reward-model stages (linked) "
                        "so that only PPO and the evaluation run again, e.g. with another kl_coef")
    parser.add_argument("--kl", type=float, nargs="+", default=None,
                        help="a gold-vs-KL frontier: run both arms at each kl_coef (rewards normalised by their "
                             "spread, so one coefficient is one trade-off); the SFT and reward-model stages of a "
                             "seed are trained once and shared by its kl runs")
    parser.add_argument("--gold", choices=("contextual", "lexical"), default="contextual",
                        help="the gold scorer: a MiniLM classifier fine-tuned on IMDB train labels (contextual; the "
                             "bag-of-words one is then reported beside it) or the bag-of-words one alone (lexical)")
    parser.add_argument("overrides", nargs="*", help="FGConfig key=value settings for every seed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not DATA.is_dir():
        print(f"skipping: {DATA} not found")
        return 0
    started = time.time()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    train, test = read_reviews("train"), read_reviews("test")
    lexical = BagOfWordsSentiment(train)
    test_acc = float(np.mean([(p > 0.5) == bool(r["label"]) for p, r in zip(
        lexical.proba([r["text"] for r in test]), test)]))
    lexical_info = {"kind": "bag-of-words logistic regression on imdb/train labels", "train_reviews": len(train),
                    "test_accuracy": test_acc}
    edits = make_edits(test, args.prompt_words, args.answer_words, negative_words())[: args.edits]
    edits_path = out / "edits.jsonl"
    edits_path.write_text("".join(json.dumps(e) + "\n" for e in edits))
    if args.gold == "contextual":
        gold, gold_info = contextual_gold(train, test, args.answer_words, out / "gold_contextual.safetensors",
                                          args.smoke)
        others = {"lexical_gold": lexical}
        print(f"gold (contextual): window accuracy {gold_info['window_accuracy']:.3f}, review accuracy "
              f"{gold_info['review_accuracy']:.3f}; lexical gold (reported beside it): {test_acc:.3f}", flush=True)
    else:
        gold, gold_info, others = lexical, lexical_info, {}
    print(f"gold classifier: {gold_info['kind']}; {len(edits)} edits -> {edits_path}", flush=True)

    settings = dict(
        edits=str(edits_path), chat_template=False, sft_epochs=1, rm_epochs=2, rm_learning_rate=3e-4,
        ppo_updates=10, ppo_batch_size=16, ppo_mini_batch_size=8, ppo_epochs=2, ppo_learning_rate=1e-3,
        kl_coef=0.05, max_new_tokens=24, shared_critic=True, max_eval_prompts=60, top_layers=10,
    )
    if args.smoke:
        settings.update(fast=True, max_eval_prompts=8, sft_epochs=1, sft_batch_size=4, rm_epochs=1, rm_batch_size=4,
                        ppo_updates=2, ppo_batch_size=4, ppo_mini_batch_size=2, max_new_tokens=6, top_layers=1,
                        lora_r=4, rm_lora_r=4)
    result: dict = {"args": vars(args), "settings": settings, "edits": len(edits),
                    "gold_classifier": gold_info, "other_golds": {"lexical_gold": lexical_info} if others else {},
                    "per_seed": {}}
    results_path = Path(args.results)
    from tokencredit.config import load_config

    if args.kl:
        return frontier(args, settings, gold, result, results_path, out, started, others)
    for seed in args.seeds:
        cfg = load_config(FGConfig, None, [*(f"{k}={v}" for k, v in settings.items()), *args.overrides,
                                           f"seed={seed}", f"output={out / f'seed{seed}'}", "resume=true"])
        if args.stages_from:
            _link_stages(Path(args.stages_from) / f"seed{seed}", Path(cfg.output))
        t0 = time.time()
        summary = run_fg(cfg, gold_scorer=gold)
        result["per_seed"][str(seed)] = {**{k: summary[k] for k in ("policies", "reward_models",
                                                                    "gold_on_heldout_edits", "data", "timings_s")},
                                         "other_golds": other_golds(Path(cfg.output), others, edits_path),
                                         "minutes": round((time.time() - t0) / 60, 1)}
        result["summary"] = summarize(result["per_seed"])
        result["minutes"] = round((time.time() - started) / 60, 1)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"seed {seed} done in {result['per_seed'][str(seed)]['minutes']} min: "
              + json.dumps({p: round(summary["policies"][p]["gold"], 4) for p in POLICIES}), flush=True)
    write_chart(result, results_path.with_suffix(".svg"))
    print_table(result)
    return 0


def _link_stages(source: Path, target: Path) -> None:
    """Give target another run's SFT and reward-model stages, so that only PPO and evaluation run. Hard links
    (run folders refuse symbolic ones; these take no space); the done markers name the target's own copies."""
    import os
    import shutil

    for stage in ("sft", "token_rm", "sequence_rm"):
        if (target / stage).exists():
            continue
        target.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source / stage, target / stage, copy_function=os.link,
                        ignore=shutil.ignore_patterns("checkpoints"))
        marker = target / stage / "done.json"
        info = json.loads(marker.read_text())
        if isinstance(info.get("model"), str) and info["model"].startswith(str(source)):
            info["model"] = str(target) + info["model"][len(str(source)):]
        marker.unlink()  # a new file, not a write through the link into the source's marker
        marker.write_text(json.dumps(info))


def other_golds(run: Path, scorers: dict, edits_path: Path) -> dict:
    """Scorers besides the run's gold, applied afterwards to each policy's held-out answers
    (generations_<policy>.json): mean score, win rate against SFT, and the share of all the edits (training and
    held-out) whose edited answer it prefers."""
    from tokencredit.recipes.fg import gold_win_rate

    out: dict = {}
    for name, scorer in scorers.items():
        scores = {p: scorer.proba(json.loads((run / f"generations_{p}.json").read_text())["texts"]) for p in POLICIES}
        edits = [json.loads(line) for line in edits_path.read_text().splitlines() if line.strip()]
        edited, original = scorer.proba([e["edited"] for e in edits]), scorer.proba([e["original"] for e in edits])
        out[name] = {"policies": {p: statistics.fmean(v) for p, v in scores.items()},
                     "win_rate_vs_sft": {p: gold_win_rate(scores[p], scores["sft"]) for p in POLICIES[1:]},
                     "edited_preferred": statistics.fmean(float(a > b) for a, b in zip(edited, original))}
    return out


def _final_kl(run: Path, arm: str, last: int = 3) -> float | None:
    """An arm's KL to the start at the end of PPO: the mean of its last updates' kl/mean."""
    from tokencredit.runs import read_metrics

    rows = [r["kl/mean"] for r in read_metrics(run / arm) if "kl/mean" in r]
    return statistics.fmean(rows[-last:]) if rows else None


def frontier(args: argparse.Namespace, settings: dict, gold: object, result: dict, results_path: Path, out: Path,
             started: float, others: dict | None = None) -> int:
    """Both arms at every kl_coef of every seed; per point the gold score, its win rate against SFT, the final
    KL and text quality; written after every run, charted as gold against KL."""
    from tokencredit.config import load_config

    result["frontier"] = result.get("frontier", {})
    for seed in args.seeds:
        first = out / f"seed{seed}" / f"kl{args.kl[0]}"
        for kl in args.kl:
            folder = out / f"seed{seed}" / f"kl{kl}"
            cfg = load_config(FGConfig, None, [*(f"{k}={v}" for k, v in settings.items()), *args.overrides,
                                               f"kl_coef={kl}", f"seed={seed}", f"output={folder}", "resume=true"])
            if folder != first:
                _link_stages(first, folder)
            t0 = time.time()
            summary = run_fg(cfg, gold_scorer=gold)
            point = {"policies": summary["policies"], "reward_models": summary["reward_models"],
                     "gold_on_heldout_edits": summary.get("gold_on_heldout_edits"),
                     "gold_win_rate_vs_sft": summary.get("gold_win_rate_vs_sft"),
                     "reward_spread": summary.get("reward_spread"),
                     "final_kl": {arm: _final_kl(folder, arm) for arm in POLICIES[1:]},
                     "other_golds": other_golds(folder, others or {}, out / "edits.jsonl"),
                     "minutes": round((time.time() - t0) / 60, 1)}
            result["frontier"].setdefault(str(seed), {})[str(kl)] = point
            result["minutes"] = round((time.time() - started) / 60, 1)
            results_path.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(result, indent=1) + "\n")
            print(f"seed {seed} kl {kl}: " + json.dumps({arm: {"gold": round(point["policies"][arm]["gold"], 4),
                                                              "kl": point["final_kl"].get(arm),
                                                              "distinct_1": round(point["policies"][arm]["distinct_1"],
                                                                                  3)}
                                                        for arm in POLICIES}), flush=True)
    write_frontier_chart(result, results_path.with_suffix(".svg"))
    return 0


def write_frontier_chart(result: dict, path: Path) -> None:
    """Gold score against final KL, one line per arm through its kl_coef points (mean over seeds)."""
    from tokencredit.evaluate import svg_scatter_lines

    series = {}
    for arm in POLICIES[1:]:
        points = []
        kls = sorted({float(k) for runs in result["frontier"].values() for k in runs})
        for kl in kls:
            runs = [r[str(kl)] for r in result["frontier"].values() if str(kl) in r]
            xs = [r["final_kl"][arm] for r in runs if r["final_kl"].get(arm) is not None]
            ys = [r["policies"][arm]["gold"] for r in runs]
            if xs and ys:
                points.append((statistics.fmean(xs), statistics.fmean(ys)))
        series[arm] = points
    sft = [r["policies"]["sft"]["gold"] for runs in result["frontier"].values() for r in runs.values()]
    if sft:
        series["sft (KL 0)"] = [(0.0, statistics.fmean(sft))]
    path.write_text(svg_scatter_lines(series, "FG frontier: gold P(positive) against KL to the start (mean over "
                                              "seeds, one point per kl_coef)", "KL to the start", "gold") + "\n")


if __name__ == "__main__":
    sys.exit(main())
