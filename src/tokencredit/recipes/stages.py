"""What every recipe's pipeline shares: stage folders with done markers, the run folder claim, model checks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tokencredit.config import claim_folder_for, save_config
from tokencredit.runs import atomic_write_json

__all__ = ["Stage", "check_fast_model", "clamp_layers", "claim_recipe_folder", "progress_over"]


def check_fast_model(fast: bool, model: str, field_name: str = "model") -> None:
    """Refuse fast=true with a model other than the built-in one: fast mode trains a tiny random model instead."""
    if fast and model != "smollm2-135m-instruct":
        raise ValueError(f"fast=true trains a tiny random model and would ignore {field_name}={model!r}; "
                         "drop one of the two")


def claim_recipe_folder(root: Path, cfg: object) -> Callable[[], None]:
    """Claim a recipe's output folder (see config.claim_folder_for), create it and save the settings; returns
    the call that drops a replaced run once this one has finished."""
    from tokencredit.distributed import launched_world_size

    if launched_world_size() > 1:
        # A recipe writes reports, summaries and stage folders of its own; every rank would write them.
        raise ValueError("recipes run in one process; under accelerate launch use the ppo, sft and reward train "
                         "commands (or PPOTrainer / SFTTrainer), see docs/distributed.md")
    drop = claim_folder_for(cfg, root)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    return drop


class Stage:
    """A pipeline stage folder with a done marker, so a re-run can skip it."""

    def __init__(self, root: Path, name: str, resume: bool) -> None:
        """Stage `name` under root."""
        self.dir = root / name
        self.resume = resume

    @classmethod
    def reused(cls, root: Path, name: str, resume: bool, reuse_from: str | None) -> Stage:
        """Stage `name` of this run, or the finished one of the run folder `reuse_from` (an error if unfinished)."""
        if reuse_from is None:
            return cls(root, name, resume)
        stage = cls(Path(reuse_from), name, resume=True)
        if not stage.done:
            raise ValueError(f"reuse_stages={reuse_from}: its {name} stage is not finished ({stage.dir / 'done.json'} "
                             "is missing); run that demo to the end first")
        return stage

    @property
    def done(self) -> bool:
        """Finished in an earlier run and resume is on."""
        return self.resume and (self.dir / "done.json").exists()

    def finish(self, info: dict) -> None:
        """Mark finished."""
        atomic_write_json(self.dir / "done.json", info)

    def info(self) -> dict:
        """What finish() recorded."""
        return json.loads((self.dir / "done.json").read_text())


def clamp_layers(model_name: str, top_layers: int | None) -> int | None:
    """top_layers, or None (every block) when the model has no more blocks than that."""
    from transformers import AutoConfig

    from tokencredit.models import resolve_model

    if top_layers is None:
        return None
    n = getattr(AutoConfig.from_pretrained(resolve_model(model_name)), "num_hidden_layers", None)
    return None if n is not None and n <= top_layers else top_layers


def progress_over(items: object, desc: str, unit: str) -> object:
    """A named progress bar over a long stage's loop."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, dynamic_ncols=True)
