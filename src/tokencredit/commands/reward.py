"""`tokencredit reward train|eval|show`: train and evaluate token, sequence or PGG reward models from files,
and draw where a token reward model puts credit.

Data formats (see :mod:`tokencredit.rewards.data`): ``pairs`` ({prompt, chosen, rejected}), ``edits``
({prompt, original, edited, chosen?}), ``ranked`` ({prompt, responses, scores | ranking}) or ``spans``
({prompt, response, spans: [{start, end, label}]}, token labels such as `tokencredit judge task=spans` writes).

- ``kind=token``: pairs train Bradley-Terry on summed token rewards; edits train one of the FG losses picked
  by ``token_loss`` (see TOKEN_LOSSES); ranked lists give every strictly ordered pair.
- ``kind=sequence``: Bradley-Terry on pairs; an edit gives the pair (chosen or edited, original); a ranked
  list gives its ordered pairs.
- ``kind=pgg``: a bounded token RM fitted to ranked lists with ListMLE (pairs count as lists of two).
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tokencredit.config import ConfigError, claim_folder_for
from tokencredit.distributed import process_group
from tokencredit.models import LoraSettings
from tokencredit.rewards.token_rm_training import TOKEN_LOSSES
from tokencredit.run_folders import releases_run_folders
from tokencredit.runs import atomic_write_json

log = logging.getLogger(__name__)



@dataclass
class RewardRunConfig:
    """Settings of `tokencredit reward train|eval|show`."""

    # token: a reward per token; sequence: one score per response; pgg: a bounded token RM fitted to rankings
    kind: Literal["token", "sequence", "pgg"] = "token"
    model: str = "smollm2-135m-instruct"  # train: backbone to start from; eval/show: a trained RM folder
    data: str | None = None  # train/eval: a .jsonl of pairs, edits or ranked lists
    # record layout of `data`: pairs {prompt, chosen, rejected}, edits {prompt, original, edited, chosen?}, ranked
    # {prompt, responses, scores | ranking} or spans {prompt, response, spans: [{start, end, label}]}
    data_format: Literal["pairs", "edits", "ranked", "spans"] = "pairs"
    prompt_field: str | None = "prompt"  # None: records have no prompt (the responses hold everything)
    max_examples: int | None = None  # use only the first N records
    output_dir: str = "runs/reward"  # train: run folder (model/ inside); eval: eval.json; show: show.html
    lora: LoraSettings | None = None  # train LoRA adapters (merged when saved) instead of every weight
    num_epochs: int = 1  # train: passes over the data
    batch_size: int = 8  # train: pairs, token examples or ranked lists per step; eval/show: scoring batch
    learning_rate: float = 1e-4  # train: AdamW learning rate
    max_length: int = 512  # prompt + response tokens seen in training (prompts lose their start first)
    # a response longer than max_length - 1 tokens (EOS included): "error" names its file and line; "truncate"
    # cuts it to fit (its end is then never seen, which can turn a preference into a tie) and warns
    long_records: Literal["error", "truncate"] = "error"
    eval_fraction: float = 0.1  # train: share of the data held out for the final eval; 0 = none
    token_loss: str | None = None  # kind=token: a TOKEN_LOSSES name; None = hybrid on edits, bce on spans, else bt
    balance_labels: bool = True  # token RM BCE: good and bad tokens weigh equally
    aggregator: str = "avg"  # kind=pgg: sum, avg, softmax or softmin (C-scaled; see rewards/pgg_rm.py)
    seed: int = 0  # train: seeds the new weights (head, LoRA), the eval split, data order and dropout
    progress: bool = True  # train: progress bar
    overwrite: bool = False  # train: replace a run already in output_dir (kept aside until the new model is saved)
    resume: bool = False  # train: continue the run in output_dir from its newest checkpoint (same data and settings)
    allow_changed_settings: bool = False  # train: resume even though settings differ from the saved config.yaml
    save_every: int | None = 50  # train: checkpoint every N steps and after the last; None = no checkpoints
    keep_checkpoints: int = 1  # train: newest checkpoints kept
    # show: texts to draw, each {"prompt": ..., "response": ...} (or a .jsonl file of them in `data`)
    texts: list[dict] = field(default_factory=list)


@dataclass
class _Data:
    """What a data file gives each kind of reward model."""

    pairs: list = field(default_factory=list)  # PreferencePair
    token_examples: list = field(default_factory=list)  # TokenExample: FG labels of each edit's two sides
    edits: list = field(default_factory=list)  # EditTriple
    lists: list = field(default_factory=list)  # RankedList


def _records(cfg: RewardRunConfig) -> _Data:
    """Read cfg.data in cfg.data_format."""
    from tokencredit.rewards.data import RankedList, load_edits, load_pairs, load_ranked, load_span_examples
    from tokencredit.rewards.edits import edit_examples
    from tokencredit.rewards.records import PreferencePair

    if cfg.data is None:
        raise ConfigError("reward train/eval needs data=FILE.jsonl (pairs, edits or ranked, see data_format)")
    if cfg.data_format == "pairs":
        pairs = load_pairs(cfg.data, prompt_field=cfg.prompt_field)[: cfg.max_examples]
        return _Data(pairs=pairs, lists=[RankedList(p.prompt, [p.chosen, p.rejected], [1.0, 0.0]) for p in pairs])
    if cfg.data_format == "ranked":
        lists = load_ranked(cfg.data, prompt_field=cfg.prompt_field)[: cfg.max_examples]
        return _Data(pairs=[pair for lst in lists for pair in lst.preference_pairs()], lists=lists)
    if cfg.data_format == "spans":
        return _Data(token_examples=load_span_examples(cfg.data, prompt_field=cfg.prompt_field)[: cfg.max_examples])
    if cfg.data_format != "edits":
        raise ConfigError(f"data_format must be pairs, edits, ranked or spans (got {cfg.data_format!r})")
    triples = load_edits(cfg.data, prompt_field=cfg.prompt_field)[: cfg.max_examples]
    data = _Data(edits=triples)
    for triple in triples:
        original, edited, _ = edit_examples(triple)
        data.token_examples += [original, edited]
        data.pairs.append(PreferencePair(triple.prompt, triple.chosen or triple.edited, triple.original))
    return data


def token_loss_weights(cfg: RewardRunConfig) -> dict[str, float]:
    """TokenRMConfig loss weights of cfg.token_loss (the others 0), checked against the data format."""
    default = {"edits": "hybrid", "spans": "bce"}.get(cfg.data_format, "bt")
    name = cfg.token_loss or default
    if name not in TOKEN_LOSSES:
        raise ConfigError(f"token_loss must be one of {sorted(TOKEN_LOSSES)} (got {name!r})")
    if cfg.data_format == "spans" and name != "bce":
        raise ConfigError(f"span-labelled responses train token_loss=bce (got {name!r}): they have no pairs")
    if name != "bt" and cfg.data_format not in ("edits", "spans"):
        raise ConfigError(f"token_loss={name} needs token labels, i.e. data_format=edits; "
                          f"{cfg.data_format} data trains token_loss=bt")
    return {"bce_weight": 0.0, "bt_weight": 0.0, "span_bt_weight": 0.0, "edit_bt_weight": 0.0,
            **TOKEN_LOSSES[name]}


# Response fields of each data format (the default field names the loaders read).
_RESPONSE_FIELDS = {"pairs": ("chosen", "rejected"), "edits": ("original", "edited", "chosen"),
                    "ranked": ("responses",), "spans": ("response",)}


def check_lengths(cfg: RewardRunConfig, tokenizer: object, positions: int | None) -> None:
    """Refuse (or, with long_records=truncate, warn about) responses that max_length would cut, by file:line."""
    from tokencredit.record_files import read_jsonl
    from tokencredit.rewards.data import RewardDataError
    from tokencredit.textbounds import encode_within

    if cfg.long_records not in ("error", "truncate"):
        raise ConfigError(f"long_records must be 'error' or 'truncate' (got {cfg.long_records!r})")
    if positions is not None and cfg.max_length > positions:
        raise ConfigError(f"max_length={cfg.max_length} is more than the {positions} positions of {cfg.model}; "
                          f"use max_length <= {positions}")
    if cfg.data is None:
        return
    where, texts = [], []
    for count, (lineno, obj) in enumerate(read_jsonl(cfg.data)):
        if cfg.max_examples is not None and count >= cfg.max_examples:
            break
        for name in _RESPONSE_FIELDS.get(cfg.data_format, ()):
            values = obj.get(name)
            for text in values if isinstance(values, list) else [values]:
                if isinstance(text, str):
                    where.append(lineno)
                    texts.append(text)
    if not texts:
        return
    keep = cfg.max_length - 1  # responses keep max_length - 1 tokens, EOS included: one is left for the prompt
    # None: more than keep - 1 tokens by the text's length alone, so a huge response is never tokenized.
    encoded = encode_within(tokenizer, texts, keep - 1, add_special_tokens=False)
    lengths = [None if ids is None else len(ids) + 1 for ids in encoded]
    long = sorted({lineno: n for lineno, n in zip(where, lengths) if n is None or n > keep}.items())
    if not long:
        return
    lines = ", ".join(str(lineno) for lineno, _ in long[:10]) + (" ..." if len(long) > 10 else "")
    first, n = long[0]
    size = f"more than {keep} tokens long" if n is None else f"{n} tokens long"
    message = (f"{cfg.data}:{first}: a response is {size} (EOS included) but max_length={cfg.max_length} "
               f"keeps {keep}; {len(long)} record(s) in all (line {lines})")
    if cfg.long_records == "error":
        raise RewardDataError(f"{message}. Raise max_length, shorten those responses, or pass "
                              "long_records=truncate to cut them (the cut-off ends are then never seen)")
    log.warning("%s; cut to fit (long_records=truncate)", message)


@releases_run_folders
def reward_train(cfg: RewardRunConfig) -> dict:
    """Train the configured reward model; returns its held-out evaluation."""
    from tokencredit.rewards.pgg_rm import PGGRMConfig, train_pgg_reward_model
    from tokencredit.rewards.seq_rm import SeqRMConfig, SequenceRewardModel, train_sequence_reward_model
    from tokencredit.rewards.token_rm import TokenRewardModel
    from tokencredit.rewards.token_rm_training import TokenRMConfig, train_token_reward_model

    if cfg.kind not in ("token", "sequence", "pgg"):
        raise ConfigError(f"kind must be token, sequence or pgg (got {cfg.kind!r})")
    if cfg.data_format == "spans" and cfg.kind != "token":
        raise ConfigError(f"span-labelled responses train a token RM (kind=token), not kind={cfg.kind}")
    weights = token_loss_weights(cfg) if cfg.kind == "token" else None
    data = _records(cfg)
    common = dict(output_dir=cfg.output_dir, seed=cfg.seed, num_epochs=cfg.num_epochs, batch_size=cfg.batch_size,
                  learning_rate=cfg.learning_rate, eval_fraction=cfg.eval_fraction, progress=cfg.progress,
                  max_length=cfg.max_length, save_every=cfg.save_every, keep_checkpoints=cfg.keep_checkpoints,
                  resume=cfg.resume)
    if cfg.kind == "sequence":
        rm = SequenceRewardModel.from_pretrained(cfg.model, lora=cfg.lora, seed=cfg.seed)
    else:
        rm = TokenRewardModel.from_pretrained(cfg.model, lora=cfg.lora, seed=cfg.seed)
    check_lengths(cfg, rm.tokenizer, getattr(rm.model.backbone.config, "max_position_embeddings", None))
    # Input checked first; then, before anything is written, the folder must be this run's (see
    # run_folders.claim_run_folder); rank 0 decides.
    group = process_group()
    drop_replaced = group.on_main(lambda: claim_folder_for(cfg, cfg.output_dir), default=lambda: None)
    if cfg.kind == "sequence":
        history = train_sequence_reward_model(rm, SeqRMConfig(**common), data.pairs, run_settings=cfg)
    elif cfg.kind == "pgg":
        history = train_pgg_reward_model(rm, PGGRMConfig(**common, aggregator=cfg.aggregator), data.lists,
                                         run_settings=cfg)
    else:
        config = TokenRMConfig(**common, balance_labels=cfg.balance_labels, **weights)
        uses_edits = weights["span_bt_weight"] or weights["edit_bt_weight"]
        history = train_token_reward_model(rm, config,
                                           token_examples=data.token_examples if weights["bce_weight"] else (),
                                           pairs=data.pairs if weights["bt_weight"] else (),
                                           edits=data.edits if uses_edits else (), run_settings=cfg)
    group.on_main(drop_replaced)  # the new model is saved: a replaced run can go
    return history[-1]["eval"]


def reward_eval(cfg: RewardRunConfig) -> dict:
    """Pairwise accuracy (summed token rewards for a token RM); for a token RM on edits also token P/R and
    span accuracy; for a PGG RM also the ranking accuracy of its aggregated scores."""
    from tokencredit.rewards.pgg_rm import evaluate_pgg_reward_model
    from tokencredit.rewards.seq_rm import SequenceRewardModel, evaluate_sequence_reward_model
    from tokencredit.rewards.token_rm import TokenRewardModel
    from tokencredit.rewards.token_rm_training import evaluate_token_reward_model

    if cfg.kind not in ("token", "sequence", "pgg"):
        raise ConfigError(f"kind must be token, sequence or pgg (got {cfg.kind!r})")
    data = _records(cfg)
    if cfg.kind == "sequence":
        metrics = evaluate_sequence_reward_model(SequenceRewardModel.from_pretrained(cfg.model), data.pairs,
                                                 cfg.batch_size, max_length=cfg.max_length)
    else:
        rm = TokenRewardModel.from_pretrained(cfg.model)
        metrics = evaluate_token_reward_model(rm, data.token_examples, data.pairs, batch_size=cfg.batch_size,
                                              edits=data.edits)
        if cfg.kind == "pgg":
            metrics.update(evaluate_pgg_reward_model(rm, data.lists, cfg.aggregator, batch_size=cfg.batch_size,
                                                     max_length=cfg.max_length))
    metrics = {"kind": cfg.kind, "model": cfg.model, "data": cfg.data, **metrics}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "eval.json", metrics)
    return metrics


def reward_show(cfg: RewardRunConfig) -> Path:
    """Write show.html: each text's tokens coloured by the token RM's reward (hover for values)."""
    from tokencredit.evaluate import html_table, token_heatmap_html, token_pieces, write_html_report
    from tokencredit.record_files import read_jsonl
    from tokencredit.rewards.token_rm import TokenRewardModel

    items = list(cfg.texts)
    if cfg.data is not None:
        items += [obj for _, obj in read_jsonl(cfg.data)]
    if not items:
        raise ConfigError('reward show needs texts=[{"prompt": ..., "response": ...}] or data=FILE.jsonl')
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("response"), str):
            raise ConfigError(f"text {i}: needs a string 'response' (and optionally a 'prompt')")
    rm = TokenRewardModel.from_pretrained(cfg.model)
    prompts = [str(item.get("prompt", "")) for item in items]
    responses = [item["response"] for item in items]
    ids = [rm.encode_response(r) for r in responses]
    rewards = rm.score_token_ids(prompts, ids, cfg.batch_size)
    # A bounded (PGG) reward lies in (0, 1): colour its distance from the neutral 0.5.
    centre = 0.5 if rm.bounded else 0.0
    colours = [[r - centre for r in row] for row in rewards]
    scale = max((abs(r) for row in colours for r in row), default=1.0) or 1.0
    blocks, rows = [], []
    for prompt, row_ids, row, colour in zip(prompts, ids, rewards, colours):
        blocks.append(f"<p class='small'>{html.escape(prompt)}</p>"
                      f"<p>{token_heatmap_html(token_pieces(rm.tokenizer, row_ids), colour, scale)}</p>")
        rows.append({"sum": sum(row), "min": min(row), "max": max(row), "tokens": len(row)})
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "show.html"
    what = "above 0.5, red: below (a bounded PGG reward; hover values are r - 0.5)" if rm.bounded else \
        "positive token reward, red: negative"
    note = (f"<p class='small'>Green: {what}; one colour scale for the page "
            f"(|r| = {scale:.3g} is full colour). Model: {html.escape(cfg.model)}.</p>")
    write_html_report(path, "tokencredit: per-token rewards", [("Texts", note + "".join(blocks)),
                                                                ("Totals", html_table(rows))])
    return path


def run_reward(cfg: RewardRunConfig, action: str) -> None:
    """Dispatch `tokencredit reward ACTION` and print its result as JSON."""
    if action == "train":
        from tokencredit.distributed import is_main_process

        metrics = reward_train(cfg)
        if is_main_process():  # every rank trained; one reports
            print(json.dumps(metrics, indent=1))
    elif action == "eval":
        print(json.dumps(reward_eval(cfg), indent=1))
    elif action == "show":
        print(json.dumps({"html": str(reward_show(cfg))}))
    else:
        raise ConfigError(f"unknown reward action {action!r}; use train, eval or show")
