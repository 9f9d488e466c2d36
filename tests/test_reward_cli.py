"""`tokencredit reward train|eval|show` on tiny models."""

import json
import random

import pytest

from tokencredit.cli import main
from tokencredit.testing import save_tiny_causal_lm, toy_preference_pairs

WORDS = "a b c d x y".split()


@pytest.fixture
def setup(tmp_path):
    save_tiny_causal_lm(tmp_path / "backbone", WORDS)
    rng = random.Random(0)
    pairs, edits = toy_preference_pairs(48, rng), []
    for _ in range(24):
        words = [rng.choice("ab") for _ in range(4)]
        bad = list(words)
        bad[rng.randrange(4)] = "x"
        edits.append({"prompt": "c", "original": " ".join(bad), "edited": " ".join(words)})
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    (tmp_path / "edits.jsonl").write_text("\n".join(json.dumps(e) for e in edits) + "\n")
    return tmp_path


def common(setup, name):
    return [f"output_dir={setup / name}", "progress=false", "num_epochs=3", "learning_rate=3e-3", "batch_size=8"]


@pytest.mark.parametrize("kind", ["token", "sequence"])
def test_train_then_eval_on_pairs(setup, kind, capsys):
    assert main(["reward", "train", f"kind={kind}", f"model={setup / 'backbone'}", f"data={setup / 'pairs.jsonl'}",
                 *common(setup, kind)]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["pairs"] == 5
    held = json.loads((setup / kind / "eval.json").read_text())
    assert held["pairs"] == 5 and held["pair_accuracy"] is not None
    assert main(["reward", "eval", f"kind={kind}", f"model={setup / kind / 'model'}",
                 f"data={setup / 'pairs.jsonl'}", f"output_dir={setup / (kind + '-eval')}"]) == 0
    metrics = json.loads((setup / (kind + "-eval") / "eval.json").read_text())
    assert metrics["pairs"] == 48 and metrics["kind"] == kind
    assert metrics["pair_accuracy"] >= 0.75  # the preference (more y) is learnable in 3 epochs


@pytest.mark.parametrize("loss", ["span_bt", "hybrid", "bce"])
def test_every_fg_token_loss_trains_from_the_command_line(setup, loss):
    assert main(["reward", "train", f"model={setup / 'backbone'}", f"data={setup / 'edits.jsonl'}",
                 "data_format=edits", f"token_loss={loss}", *common(setup, loss)]) == 0
    metrics = json.loads((setup / loss / "eval.json").read_text())
    logged = json.loads((setup / loss / "metrics.jsonl").read_text().splitlines()[0])
    assert ("loss/span_bt" in logged) == (loss in ("span_bt", "hybrid"))
    assert ("loss/edit_bt" in logged) == (loss == "hybrid")
    assert ("loss/bce" in logged) == (loss == "bce")
    assert (metrics["edits"] > 0) == (loss != "bce")


def test_pgg_kind_trains_on_ranked_lists_and_on_pairs(setup):
    rng = random.Random(1)
    lists = []
    for _ in range(40):
        responses = [" ".join(rng.choice("xy") for _ in range(rng.randint(2, 5))) for _ in range(3)]
        lists.append({"prompt": rng.choice("ab"), "responses": responses,
                      "scores": [r.split().count("y") / len(r.split()) for r in responses]})
    (setup / "ranked.jsonl").write_text("\n".join(json.dumps(x) for x in lists) + "\n")
    assert main(["reward", "train", "kind=pgg", f"model={setup / 'backbone'}", f"data={setup / 'ranked.jsonl'}",
                 "data_format=ranked", *common(setup, "pgg")]) == 0
    held = json.loads((setup / "pgg" / "eval.json").read_text())
    assert held["lists"] == 4 and held["rank_pair_accuracy"] is not None
    assert main(["reward", "eval", "kind=pgg", f"model={setup / 'pgg' / 'model'}", f"data={setup / 'ranked.jsonl'}",
                 "data_format=ranked", f"output_dir={setup / 'pgg-eval'}"]) == 0
    metrics = json.loads((setup / "pgg-eval" / "eval.json").read_text())
    assert metrics["lists"] == 40 and metrics["rank_pair_accuracy"] >= 0.75
    assert main(["reward", "show", f"model={setup / 'pgg' / 'model'}", 'texts=[{"response": "y x"}]',
                 f"output_dir={setup / 'pgg-show'}"]) == 0
    page = (setup / "pgg-show" / "show.html").read_text()
    assert "bounded PGG" in page and page.count('class="tok"') == 3
    assert main(["reward", "train", "kind=pgg", f"model={setup / 'backbone'}", f"data={setup / 'pairs.jsonl'}",
                 *common(setup, "pgg-pairs")]) == 0
    assert json.loads((setup / "pgg-pairs" / "eval.json").read_text())["lists"] == 5


def test_token_rm_trains_on_judge_span_labels(setup, capsys):
    rng = random.Random(2)
    rows = []
    for _ in range(40):
        words = [rng.choice("xyab") for _ in range(rng.randint(2, 5))]
        text, spans, pos = " ".join(words), [], 0
        for w in words:
            if w in "xy":
                spans.append({"start": pos, "end": pos + 1, "label": 1 if w == "y" else -1})
            pos += 2
        rows.append({"prompt": "c", "response": text, "spans": spans})
    (setup / "spans.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["reward", "train", f"model={setup / 'backbone'}", f"data={setup / 'spans.jsonl'}",
                 "data_format=spans", *common(setup, "spans")]) == 0
    held = json.loads((setup / "spans" / "eval.json").read_text())
    assert held["token_examples"] == 4 and held["labelled_tokens"] > 0
    (setup / "badspans.jsonl").write_text(json.dumps({"prompt": "c", "response": "x y",
                                                      "spans": [{"start": 0, "end": 9, "label": 1}]}) + "\n")
    assert main(["reward", "train", f"model={setup / 'backbone'}", f"data={setup / 'badspans.jsonl'}",
                 "data_format=spans", *common(setup, "e")]) == 2
    assert "badspans.jsonl:1" in capsys.readouterr().err
    assert main(["reward", "train", "kind=sequence", f"data={setup / 'spans.jsonl'}", "data_format=spans"]) == 2
    assert "kind=token" in capsys.readouterr().err


def test_token_rm_on_edits_reports_token_precision_recall_and_show_draws_it(setup):
    assert main(["reward", "train", f"model={setup / 'backbone'}", f"data={setup / 'edits.jsonl'}",
                 "data_format=edits", *common(setup, "fg")]) == 0
    assert main(["reward", "eval", f"model={setup / 'fg' / 'model'}", f"data={setup / 'edits.jsonl'}",
                 "data_format=edits", f"output_dir={setup / 'fg-eval'}"]) == 0
    metrics = json.loads((setup / "fg-eval" / "eval.json").read_text())
    assert metrics["pairs"] == 24 and metrics["token_examples"] == 48
    # About one replaced word per original and one replacing word per edit (difflib may split a replacement).
    assert 48 <= metrics["labelled_tokens"] <= 60
    assert metrics["token_precision"] is not None and metrics["token_bad_recall"] is not None
    texts = '[{"prompt": "c", "response": "a x b"}, {"response": "b a"}]'
    assert main(["reward", "show", f"model={setup / 'fg' / 'model'}", f"texts={texts}",
                 f"output_dir={setup / 'show'}"]) == 0
    page = (setup / "show" / "show.html").read_text()
    assert page.count('class="tok"') == 4 + 3  # tokens + the end token of each text
    assert 'title="' in page and "Totals" in page


def test_errors_are_clear(setup, capsys):
    assert main(["reward", "train", f"model={setup / 'backbone'}", *common(setup, "e")]) == 2
    assert "needs data" in capsys.readouterr().err
    (setup / "bad.jsonl").write_text('{"prompt": "a", "chosen": "x", "rejected": "y"}\n{"prompt": "a"}\n')
    assert main(["reward", "train", f"model={setup / 'backbone'}", f"data={setup / 'bad.jsonl'}",
                 *common(setup, "e")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main(["reward", "show", f"model={setup / 'backbone'}", f"output_dir={setup / 's'}"]) == 2
    assert "needs texts" in capsys.readouterr().err
    assert main(["reward", "train", "kind=bogus", f"data={setup / 'pairs.jsonl'}"]) == 2
    assert "kind" in capsys.readouterr().err
    assert main(["reward", "train", "token_loss=span_bt", f"data={setup / 'pairs.jsonl'}"]) == 2
    assert "data_format=edits" in capsys.readouterr().err
    assert main(["reward", "train", "token_loss=fancy", "data_format=edits", f"data={setup / 'edits.jsonl'}"]) == 2
    assert "token_loss must be one of" in capsys.readouterr().err


def test_over_long_responses_are_named_by_line_or_cut_with_a_warning(setup, capsys, caplog):
    pairs = [json.loads(line) for line in (setup / "pairs.jsonl").read_text().splitlines()]
    pairs[6]["rejected"] = " ".join(["y"] * 40)
    (setup / "long.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    args = ["reward", "train", f"model={setup / 'backbone'}", f"data={setup / 'long.jsonl'}", "max_length=16",
            *common(setup, "long")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "long.jsonl:7: a response is 41 tokens long" in err and "long_records=truncate" in err
    with caplog.at_level("WARNING"):
        assert main([*args, "long_records=truncate", "num_epochs=1"]) == 0
    assert any("long.jsonl:7" in r.getMessage() and "cut to fit" in r.getMessage() for r in caplog.records)
    # More positions than the backbone has is refused up front, not an index error deep in a forward pass.
    assert main([*args, "max_length=100000"]) == 2
    assert "positions" in capsys.readouterr().err


def test_training_into_a_folder_that_holds_a_run_is_refused_unless_overwrite(setup, capsys):
    args = ["reward", "train", "kind=sequence", f"model={setup / 'backbone'}", f"data={setup / 'pairs.jsonl'}",
            *common(setup, "again"), "num_epochs=1"]
    assert main(args) == 0
    first = (setup / "again" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (setup / "again" / "metrics.jsonl").read_text() == first  # the first run is untouched
    assert main([*args, "overwrite=true"]) == 0
    assert (setup / "again" / "model").is_dir() and not list(setup.glob("again.replaced-*"))
