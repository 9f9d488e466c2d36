"""Does a TPPO reward model know which words of a query are right? A check on finished tppo_aol.py runs.

For every run folder given (a ``tppo_aol.py`` arm of one seed: its ``reward_model/model`` and the SFT policy's
test-set queries in ``generations_sft.json``), each word of each SFT query gets the sum of its tokens' rewards.
Two readings:

- separation: the word AUC (the chance a word of the target query outscores one that is not; 0.5 = the reward
  knows nothing) and the mean word reward of each kind;
- what the reward asks for: keep only the words whose reward is above a threshold c and score the shortened
  queries by token F1 against the targets. A policy that maximises summed token rewards is pulled towards keeping
  exactly the words above 0 (c = 0); when that F1 is below the SFT queries' own, the reward's zero point
  is set wrong for token F1 (a word is worth keeping when its chance of being right exceeds about half the F1
  reachable).

    python benchmarks/tppo_word_filter.py /tmp/bench/aol/seed0/v2 /tmp/bench/trec/seed0/v2 ...

Writes benchmarks/results/tppo_word_filter.{json,md}; a folder already in the file is measured again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from seedstats import cpu_name  # noqa: E402 - a sibling module of this script

RESULTS = HERE / "results"
OUT = RESULTS / "tppo_word_filter.json"
THRESHOLDS = (None, -0.5, -0.3, -0.2, -0.1, 0.0, 0.1, 0.3)


def word_rewards(rm: object, prompts: list[str], queries: list[str]) -> list[list[float]]:
    """Per query, the summed token reward of each of its whitespace words."""
    ids = [rm.encode_response(q) for q in queries]
    rewards = rm.score_token_ids(prompts, ids)
    out = []
    for query, row, scores in zip(queries, ids, rewards):
        words = query.split()
        per_word = [0.0] * len(words)
        for k, score in enumerate(scores[: len(row)]):
            # the word a token belongs to: how many words the decoded prefix up to it holds
            w = len(rm.tokenizer.decode(row[: k + 1], skip_special_tokens=True).split()) - 1
            if 0 <= w < len(words):
                per_word[w] += float(score)
        out.append(per_word)
    return out


def check(folder: Path) -> dict:
    """Separation and the F1 of threshold-filtered SFT queries for one run folder."""
    from tokencredit.rewards.saved import load_saved_reward_model
    from tokencredit.tasks.querygen import _token_f1, query_tokens

    rm = load_saved_reward_model(folder / "reward_model" / "model")
    rows = json.loads((folder / "generations_sft.json").read_text())
    prompts, queries, targets = ([r[k] for r in rows] for k in ("prompt", "prediction", "target"))
    rewards = word_rewards(rm, prompts, queries)
    hits, misses = [], []
    # Words the query copies from the prompt (the search history) against new ones: on AOL the former are right
    # far more often, the one signal a reward model can learn there.
    copied: dict[str, list[tuple[bool, float]]] = {"copied": [], "new": []}
    for prompt, query, per_word, target in zip(prompts, queries, rewards, targets):
        wanted = set(query_tokens(target))
        seen = set(query_tokens(prompt.split("Searches so far:", 1)[-1]))  # the history, not the instruction
        for word, score in zip(query.split(), per_word):
            (hits if word.lower() in wanted else misses).append(score)
            kind = "copied" if set(query_tokens(word)) & seen else "new"
            copied[kind].append((word.lower() in wanted, score))
    filtered = {}
    for c in THRESHOLDS:
        kept = [" ".join(w for w, s in zip(q.split(), ws) if c is None or s > c) for q, ws in zip(queries, rewards)]
        filtered["all" if c is None else f"{c:+.1f}"] = {
            "token_f1": statistics.fmean(_token_f1(k, t) for k, t in zip(kept, targets)),
            "words": statistics.fmean(len(k.split()) for k in kept)}
    # AUC: the chance a word of the target outscores a word that is not (ties count half); 0.5 = no knowledge
    pairs = [(h > m) + 0.5 * (h == m) for h in hits for m in misses]
    return {"queries": len(queries), "words": len(hits) + len(misses),
            "word_auc": statistics.fmean(pairs) if pairs else None,
            "share_in_target": len(hits) / max(1, len(hits) + len(misses)),
            "mean_reward_in_target": statistics.fmean(hits) if hits else None,
            "mean_reward_not_in_target": statistics.fmean(misses) if misses else None,
            "by_origin": {kind: {"words": len(rows), "share_in_target": statistics.fmean(h for h, _ in rows),
                                 "mean_reward": statistics.fmean(r for _, r in rows)}
                          for kind, rows in copied.items() if rows},
            "filtered": filtered}


def write_markdown(data: dict) -> None:
    """One table row per run folder."""
    cols = ["all", *[f"{c:+.1f}" for c in THRESHOLDS if c is not None]]
    lines = ["# Does the token reward model know which words are right? (`benchmarks/tppo_word_filter.py`)", "",
             "SFT test queries of each run, scored word by word by that run's reward model. Separation: mean word "
             "reward of words in the target vs not. Then token F1 (and words per query) when only words with "
             "reward above c are kept; c = 0 is what maximising summed token rewards pulls towards. "
             f"CPU: {data.get('cpu', '?')}.", "",
             "| run | words | in target | word AUC | reward in / not | copied: share, right, reward | "
             "new: right, reward | " + " | ".join(f"F1 c={c}" for c in cols) + " |", "|---" * (7 + len(cols)) + "|"]
    for name, r in data["runs"].items():
        f1 = " | ".join(f"{r['filtered'][c]['token_f1']:.3f} ({r['filtered'][c]['words']:.1f})" for c in cols)
        origin = r.get("by_origin", {})
        cop, new = origin.get("copied"), origin.get("new")
        share = cop["words"] / max(1, r["words"]) if cop else 0.0
        cop_cell = f"{share:.2f}, {cop['share_in_target']:.2f}, {cop['mean_reward']:+.3f}" if cop else "—"
        new_cell = f"{new['share_in_target']:.2f}, {new['mean_reward']:+.3f}" if new else "—"
        lines.append(f"| {name} | {r['words']} | {r['share_in_target']:.2f} | {r['word_auc']:.2f} | "
                     f"{r['mean_reward_in_target']:.3f} / {r['mean_reward_not_in_target']:.3f} | {cop_cell} | "
                     f"{new_cell} | {f1} |")
    (RESULTS / "tppo_word_filter.md").write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Check each folder, merge into the results file, write the table."""
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("folders", nargs="+", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = json.loads(OUT.read_text()) if OUT.exists() else {"runs": {}}
    data["cpu"] = cpu_name()
    for folder in args.folders:
        name = "/".join(folder.parts[-3:])  # data / seed / arm
        data["runs"][name] = check(folder)
        r = data["runs"][name]
        for kind, row in r["by_origin"].items():
            print(f"  {kind} words: {row['words']}, right {row['share_in_target']:.2f}, mean reward "
                  f"{row['mean_reward']:+.3f}")
        print(f"{name}: word AUC {r['word_auc']:.2f}, in-target {r['mean_reward_in_target']:.3f} vs "
              f"{r['mean_reward_not_in_target']:.3f}; F1 all "
              f"{r['filtered']['all']['token_f1']:.3f}, above 0 {r['filtered']['+0.0']['token_f1']:.3f}", flush=True)
    from tokencredit.runs import atomic_write_json

    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(OUT, data)
    write_markdown(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
