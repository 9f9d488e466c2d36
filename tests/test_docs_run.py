"""Every bash and python block of the README and docs/ runs as written.

The blocks of one file run in order, in one scratch folder that holds the small data files the docs name
(``pairs.jsonl``, ``edits.jsonl``, ``imdb_train.jsonl`` ...). The built-in model name resolves to a tiny
random model with SmolLM2's real tokenizer (through ``TOKENCREDIT_CACHE``), so the commands run with their
documented settings in seconds. A block that cannot run here is preceded by
``<!-- docs-test: skip: REASON -->``; the test checks every other block does run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"<!--\s*docs-test:\s*skip:\s*(.+?)\s*-->")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


@dataclass
class Block:
    """One fenced code block of a doc."""

    doc: Path
    line: int
    lang: str
    code: str
    skip: str | None


def blocks(doc: Path) -> list[Block]:
    """The bash and python blocks of ``doc``, each with the skip reason written just above it, if any."""
    text = doc.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) not in ("bash", "python"):
            continue
        before = text[: m.start()].rstrip().splitlines()
        reason = SKIP.fullmatch(before[-1].strip()) if before else None
        out.append(Block(doc, text[: m.start()].count("\n") + 1, m.group(1), m.group(2),
                         reason.group(1) if reason else None))
    return out


def test_blocks_are_found_and_every_skip_says_why():
    found = [b for doc in DOCS for b in blocks(doc)]
    assert len(found) >= 15
    assert all(b.skip is None or len(b.skip) > 10 for b in found)
    # The first screen's two commands: one is the fresh-clone check itself, the other this very suite.
    readme = blocks(ROOT / "README.md")
    assert readme[0].skip and readme[1].skip


# ---------------------------------------------------------------------- the scratch folder
def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fixtures(folder: Path) -> None:
    """The small data files the docs name, with the shapes the docs describe."""
    rng = random.Random(0)
    good, bad = ["great", "good", "fine", "lovely"], ["awful", "bad", "dull", "poor"]
    words = "the film plot acting was it this a and story cast".split()

    def sentence(n: int, mood: list[str]) -> str:
        return " ".join([rng.choice(words) for _ in range(n)] + [rng.choice(mood)])

    _write_jsonl(folder / "pairs.jsonl", [{"prompt": f"Review {i}:", "chosen": sentence(5, good),
                                           "rejected": sentence(5, bad)} for i in range(40)])
    _write_jsonl(folder / "sft.jsonl", [{"prompt": f"Review {i}:", "response": sentence(5, good)}
                                        for i in range(16)])
    edits = []
    for i in range(24):
        original = sentence(6, bad)
        edits.append({"prompt": f"Describe film {i}.", "original": original,
                      "edited": original.rsplit(" ", 1)[0] + " " + rng.choice(good)})
    _write_jsonl(folder / "edits.jsonl", edits)
    _write_jsonl(folder / "ranked.jsonl", [{"prompt": f"Review {i}:", "responses": [sentence(3, good),
                                            sentence(6, bad), sentence(4, good)], "scores": [2.0, 0.0, 1.0]}
                                           for i in range(12)])
    (folder / "prompts.txt").write_text("".join(f"Write about film {i}.\n" for i in range(8)))
    reviews = [{"text": " ".join(sentence(14, good if i % 2 else bad).split() * 2), "label": i % 2}
               for i in range(40)]
    for name in ("imdb_train.jsonl", "imdb/train.jsonl", "imdb/test.jsonl"):
        _write_jsonl(folder / name, reviews)
    concepts = [["dog", "ball", "throw"], ["cat", "couch", "sleep"], ["kid", "room", "dance"]]
    sets = [{"concepts": c, "references": [f"The {c[0]} and the {c[1]} {c[2]}.", f"A {c[0]} likes to {c[2]}."]}
            for c in concepts * 6]
    for name in ("commongen_train.jsonl", "commongen_dev.jsonl", "commongen/dev.jsonl"):
        _write_jsonl(folder / name, sets)
    docs = [{"document": " ".join(rng.choice(words) for _ in range(60)), "summary": sentence(6, good)}
            for _ in range(12)]
    for name in ("scitldr_train.jsonl", "scitldr_test.jsonl"):
        _write_jsonl(folder / name, docs)
    split = folder / "fewshot" / "sst-2" / "16-42"
    split.mkdir(parents=True)
    for name in ("train", "dev", "test"):
        rows = ["sentence\tlabel"] + [f"{sentence(6, good if i % 2 else bad)}\t{i % 2}" for i in range(8)]
        (split / f"{name}.tsv").write_text("\n".join(rows) + "\n")
    (folder / "run.yaml").write_text("model: smollm2-135m-instruct\nnum_updates: 2\nbatch_size: 4\n"
                                     "mini_batch_size: 4\nmax_new_tokens: 4\noutput_dir: runs/ppo-yaml\n"
                                     "log_tensorboard: false\n")
    (folder / "my_scorers.py").write_text(
        "def sentiment(prompts, responses):\n"
        "    return [float(sum(w in r.split() for w in ('great', 'good', 'fine', 'lovely'))) for r in responses]\n")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder with the docs' data files and a cache whose built-in model is tiny (real tokenizer)."""
    from tokencredit.models import SMOLLM2_NAME, load_tokenizer
    from tokencredit.testing import tiny_causal_lm

    base = tmp_path_factory.mktemp("docs")
    tokenizer = load_tokenizer(SMOLLM2_NAME)
    model = tiny_causal_lm(len(tokenizer), seed=0, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    model.config.max_position_embeddings = 2048
    cache = base / "cache"
    model.save_pretrained(cache / SMOLLM2_NAME)
    tokenizer.save_pretrained(cache / SMOLLM2_NAME)
    _fixtures(base / "data")
    return base


def _env(scratch: Path) -> dict:
    env = dict(os.environ)
    env.update(TOKENCREDIT_CACHE=str(scratch / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    return env


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_block_of_the_doc_runs(doc, scratch, tmp_path):
    todo = [b for b in blocks(doc) if b.skip is None]
    if not todo:
        pytest.skip(f"{doc.name} has no runnable blocks")
    work = tmp_path / "work"
    shutil.copytree(scratch / "data", work)
    env = _env(scratch)
    for block in todo:
        if block.lang == "bash":
            cmd = ["bash", "-e", "-o", "pipefail", "-c", block.code]
        else:
            cmd = [sys.executable, "-c", block.code]
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (
            f"{doc.name}:{block.line} ({block.lang}) failed with exit {done.returncode}:\n{block.code}\n"
            f"--- stderr (end) ---\n{done.stderr[-3000:]}")
