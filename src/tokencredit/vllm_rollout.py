"""Optional vLLM rollout backend: same GenerationOutput contract as tokencredit.generation, sampled by vLLM.

Off by default and behind the ``vllm`` extra (``pip install "tokencredit[vllm]"``): this module imports vLLM only
inside ``VLLMRollout.__init__``, so ``import tokencredit.vllm_rollout`` works without it.

Log-probabilities: vLLM's default ``logprobs_mode`` is ``"raw_logprobs"``, the log-softmax of the model's logits
*before* temperature, top-k and top-p. PPO's old log-probs must come from the distribution a token was drawn from,
as the plain sampler in tokencredit.generation returns, so the engine is built with
``logprobs_mode="processed_logprobs"`` (after temperature, top-k and top-p; for greedy decoding the log-softmax of
the unscaled logits, as the plain sampler gives). vLLM returns those final values from 0.10.1 on (vllm PR #22387);
0.10.0 already knew the mode but computed it before temperature and top-k/top-p.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from packaging.version import InvalidVersion, Version
from torch import nn

from tokencredit.generation import GenerationOutput, check_sampling_args, cut_at_stop, encode_prompts
from tokencredit.models import is_peft

INSTALL_HINT = (
    'The vLLM rollout backend needs vLLM: pip install "tokencredit[vllm]" (on a machine with a GPU vLLM supports). '
    "The default rollout backend (tokencredit.generation) needs nothing extra."
)

_LOGPROBS_MODE = "processed_logprobs"


class VLLMRollout:
    """Sample rollouts with a vLLM engine and return them as a ``GenerationOutput``."""

    def __init__(
        self,
        model_path: str,
        tokenizer: object,
        *,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        **engine_kwargs: Any,
    ) -> None:
        """Start a vLLM engine on the model folder (raises ImportError with the install line without vllm)."""
        # An in-process engine core keeps the model reachable from this process, so sync_weights can copy the
        # policy into it directly; export VLLM_ENABLE_V1_MULTIPROCESSING=1 to override (sync then uses an RPC).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm
        except ImportError as err:
            raise ImportError(INSTALL_HINT) from err
        self._vllm = vllm
        self.version = str(getattr(vllm, "__version__", "unknown"))
        self.tokenizer = tokenizer
        if () < _version_tuple(self.version) < (0, 10, 1):
            warnings.warn(
                f"vLLM {self.version} returns log-probs from before temperature/top-k/top-p; upgrade to >= 0.10.1 "
                "or do not use them as the policy's log-probs.",
                stacklevel=2,
            )
        engine_kwargs.setdefault("logprobs_mode", _LOGPROBS_MODE)
        self.llm = vllm.LLM(
            model=model_path,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            **engine_kwargs,
        )

    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        greedy: bool = False,
        stop_strings: Sequence[str] = (),
        max_prompt_length: int | None = None,
        eos_ids: list[int],
    ) -> GenerationOutput:
        """Sample one response per prompt; stops on ``eos_ids`` and on stop strings."""
        check_sampling_args(temperature, greedy, max_new_tokens)
        if not eos_ids:
            raise ValueError("eos_ids must name at least one token id (see tokencredit.generation.eos_ids)")
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, max_prompt_length)
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]
        if any(not r for r in rows):
            raise ValueError("a prompt encodes to no tokens; vLLM cannot generate from an empty prompt")
        stops = [s for s in stop_strings if s]
        params = self._vllm.SamplingParams(
            n=1,
            max_tokens=max_new_tokens,
            # vLLM decodes greedily at temperature 0, and then ignores top-k/top-p as the plain sampler does.
            temperature=0.0 if greedy else temperature,
            top_k=top_k,
            top_p=top_p,
            logprobs=0,
            stop_token_ids=[int(i) for i in eos_ids],
            stop=stops or None,
            # Without the stop string in the text, as chat APIs return it; token_ids keep the completing token.
            include_stop_str_in_output=False,
            skip_special_tokens=True,
        )
        # A dict with "prompt_token_ids" is vLLM's TokensPrompt (a TypedDict), accepted by LLM.generate since 0.5.
        requests = [{"prompt_token_ids": r} for r in rows]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if len(outputs) != len(rows):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(rows)} prompts")
        completions = [out.outputs[0] for out in outputs]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else int(eos_ids[0])
        return _to_generation_output(
            prompt_ids,
            prompt_mask,
            token_ids=[list(c.token_ids) for c in completions],
            logprobs=[c.logprobs for c in completions],
            finish_reasons=[c.finish_reason for c in completions],
            texts=[c.text for c in completions],
            pad_id=pad_id,
            stop_strings=stops,
        )

    def sync_weights(self, policy: nn.Module) -> None:
        """Copy the policy's current weights (LoRA merged in, the policy untouched) into the vLLM engine."""
        model = _driver_model(self.llm)
        if model is not None:
            # load_weights takes an iterable, so weights stream in one tensor at a time.
            model.load_weights(policy_weights(policy))
        elif callable(getattr(self.llm, "collective_rpc", None)):
            # The engine runs in other processes: ship CPU copies to every worker over vLLM's RPC.
            weights = [(name, t.detach().to("cpu", copy=True)) for name, t in policy_weights(policy)]
            try:
                self.llm.collective_rpc(_load_weights_in_worker, args=(weights,))
            except Exception as err:
                raise RuntimeError(
                    f"vLLM {self.version}: pushing weights through LLM.collective_rpc failed ({err}). Keep the "
                    "engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the VLLMRollout default) or allow "
                    "callables over RPC with VLLM_ALLOW_INSECURE_SERIALIZATION=1."
                ) from err
        else:
            raise RuntimeError(
                f"vLLM {self.version}: no known way to update weights in place (tried "
                "llm.llm_engine.model_executor.driver_worker...model_runner.model.load_weights and "
                "LLM.collective_rpc)."
            )
        # Prefix-cached KV blocks were computed with the old weights.
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if callable(reset):
            reset()


def save_policy_folder(policy: nn.Module, tokenizer: object, folder: str | Path) -> Path:
    """Write the policy (LoRA merged by `policy_weights`, the policy untouched) as a folder vLLM can load."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = policy.get_base_model() if is_peft(policy) else policy
    base.config.save_pretrained(folder)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(folder)
    # One tensor at a time to the host: no second copy of the model on the GPU, as merging a deep copy would need.
    save_file({name: t.detach().to("cpu").contiguous() for name, t in policy_weights(policy)},
              str(folder / "model.safetensors"))
    tokenizer.save_pretrained(folder)
    return folder


def _to_generation_output(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    token_ids: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[Any] | None],
    finish_reasons: Sequence[str | None],
    texts: Sequence[str],
    pad_id: int,
    stop_strings: Sequence[str] = (),
) -> GenerationOutput:
    """Pad per-request vLLM results (token ids, per-token logprobs, finish reasons, texts) into a GenerationOutput.

    Each per-token logprob entry may be a float or a mapping from token id to a float or to an object with a
    ``.logprob`` attribute (vLLM's ``Logprob``); the sampled token's entry is taken.
    """
    bsz = prompt_ids.size(0)
    if not len(token_ids) == len(logprobs) == len(finish_reasons) == len(texts) == bsz:
        raise ValueError(
            f"expected {bsz} rows, got {len(token_ids)} token lists, {len(logprobs)} logprob lists, "
            f"{len(finish_reasons)} finish reasons and {len(texts)} texts"
        )
    # At least one column, as the plain sampler always returns, so "last token" indexing stays valid.
    width = max([1, *(len(t) for t in token_ids)])
    response_ids = torch.full((bsz, width), int(pad_id), dtype=torch.long)
    response_mask = torch.zeros((bsz, width), dtype=torch.long)
    out_logprobs = torch.zeros((bsz, width), dtype=torch.float32)
    for row, (ids, lps) in enumerate(zip(token_ids, logprobs)):
        n = len(ids)
        if lps is None or len(lps) != n:
            raise ValueError(
                f"row {row}: {n} tokens but {'no' if lps is None else len(lps)} logprobs; request logprobs=0"
            )
        if n:
            response_ids[row, :n] = torch.tensor([int(i) for i in ids], dtype=torch.long)
            response_mask[row, :n] = 1
            out_logprobs[row, :n] = torch.tensor(
                [_sampled_logprob(entry, int(tok)) for entry, tok in zip(lps, ids)], dtype=torch.float32
            )
    stops = [s for s in stop_strings if s]
    return GenerationOutput(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=out_logprobs,
        # vLLM already cuts at a stop string when include_stop_str_in_output is off; cutting again is a no-op then.
        texts=[cut_at_stop(t, stops) if stops else t for t in texts],
        finished=torch.tensor([r == "stop" for r in finish_reasons], dtype=torch.bool),
    )


def _sampled_logprob(entry: Any, token: int) -> float:
    """The sampled token's log-prob from one position's entry (float, Logprob, or {token id: Logprob | float})."""
    if isinstance(entry, Mapping) or hasattr(entry, "keys"):
        if token not in entry:
            raise ValueError(f"no logprob for sampled token {token} (got ids {sorted(entry)})")
        entry = entry[token]
    value = getattr(entry, "logprob", entry)
    return float(value)


def _driver_model(llm: object) -> nn.Module | None:
    """The engine's model object when it lives in this process (vLLM V0, or V1 with multiprocessing off)."""
    executor = getattr(getattr(llm, "llm_engine", None), "model_executor", None)
    worker = getattr(executor, "driver_worker", None)
    if worker is None:
        return None
    # The driver is a WorkerWrapperBase around the worker in V1; V0 exposed model_runner on the wrapper itself.
    for holder in (getattr(worker, "worker", None), worker):
        model = getattr(getattr(holder, "model_runner", None), "model", None)
        if model is not None and callable(getattr(model, "load_weights", None)):
            return model
    return None


def _load_weights_in_worker(worker: object, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Run inside each vLLM worker by LLM.collective_rpc: load (name, tensor) pairs into its model."""
    worker.model_runner.model.load_weights(weights=weights)


def policy_weights(policy: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the policy's weights under the base model's checkpoint names, LoRA merged in, without mutating it."""
    if not is_peft(policy):
        for name, param in policy.named_parameters():
            yield _strip_compile_prefix(name), param.detach()
        return
    if not _lora_deltas_suffice(policy):
        yield from _merged_copy_weights(policy)
        return
    from peft.tuners.lora import LoraLayer

    adapted = {
        f"{name}.base_layer.weight": module
        for name, module in policy.named_modules()
        if isinstance(module, LoraLayer) and not module.merged and not module.disable_adapters
    }
    active = list(policy.active_adapters)
    for name, param in policy.named_parameters():
        clean = _peft_base_name(name, active)
        if clean is None:
            continue
        module = adapted.get(name)
        yield clean, param.detach() if module is None else _merged_weight(module, param, active)


@torch.no_grad()
def _merged_weight(module: nn.Module, base: torch.Tensor, adapters: Iterable[str]) -> torch.Tensor:
    """Base weight plus the LoRA deltas of the given adapters, as a new tensor."""
    merged = base.detach().clone()
    for adapter in adapters:
        if adapter in getattr(module, "lora_A", {}) or adapter in getattr(module, "lora_embedding_A", {}):
            merged += module.get_delta_weight(adapter).to(merged.dtype)
    return merged


def _lora_deltas_suffice(policy: nn.Module) -> bool:
    """Whether base weight + get_delta_weight reproduces merging (plain LoRA: no DoRA, no LoRA bias)."""
    from peft.tuners.lora import LoraLayer

    configs = getattr(policy, "peft_config", {})
    if any(getattr(c.peft_type, "value", c.peft_type) != "LORA" for c in configs.values()):
        return False
    for module in policy.modules():
        if isinstance(module, LoraLayer):
            if not callable(getattr(module, "get_delta_weight", None)):
                return False
            for adapter in policy.active_adapters:
                if module.use_dora.get(adapter, False) or getattr(module, "lora_bias", {}).get(adapter, False):
                    return False
    return True


def _merged_copy_weights(policy: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Merge into a deep copy (costs a second model in memory); for adapter kinds the delta path does not cover."""
    merged = copy.deepcopy(policy).merge_and_unload()
    for name, param in merged.named_parameters():
        yield _strip_compile_prefix(name), param.detach()


def _peft_base_name(name: str, active: Sequence[str]) -> str | None:
    """Map a peft parameter name to the base checkpoint's name; None for adapter-only parameters."""
    parts = _strip_compile_prefix(name).split(".")
    if any(p.startswith("lora_") for p in parts) or "original_module" in parts:
        return None
    if "modules_to_save" in parts:
        i = parts.index("modules_to_save")
        if i + 1 >= len(parts) or parts[i + 1] not in active:
            return None
        parts = parts[:i] + parts[i + 2 :]
    parts = [p for p in parts if p != "base_layer"]
    if parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    return ".".join(parts)


def _strip_compile_prefix(name: str) -> str:
    """Drop torch.compile's ``_orig_mod.`` wrapper prefix from a parameter name."""
    return name.replace("_orig_mod.", "")


def _version_tuple(version: str) -> tuple[int, ...]:
    """Release numbers of a version string ("0.10.1rc2+cu128" -> (0, 10, 1)); () when it is not a version."""
    try:
        return Version(version).release
    except InvalidVersion:
        return ()
