"""PPOConfig: every knob of token-level PPO (and of RLGF's guided roll-outs), documented where declared."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tokencredit.precision import validate_mixed_precision
from tokencredit.rl.trainer_base import RunSettings

__all__ = ["PPOConfig"]


@dataclass
class PPOConfig(RunSettings):
    """Every PPO hyper-parameter, documented where declared (the run settings in :class:`RunSettings`)."""

    # --- run ---
    output_dir: str = "runs/ppo"  # run folder: config.yaml, metrics.jsonl, checkpoints/, policy/
    seed: int = 0  # seeds sampling, data order, critic head and dropout
    save_every: int = 10  # updates between checkpoints; the last update is always saved
    progress: bool = True  # progress bar with reward and KL
    num_updates: int = 100  # PPO updates (each = one rollout batch + ppo_epochs of optimisation)

    # --- rollout ---
    batch_size: int = 16  # prompts (= sampled responses) per update
    max_prompt_length: int | None = 512  # longer prompts keep their last tokens
    max_new_tokens: int = 32  # longest sampled response, in tokens
    temperature: float = 1.0  # also divides the logits when log-probs are recomputed, as PPO needs
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    stop_strings: list[str] = field(default_factory=list)  # end a response when its text contains one
    missing_eos_penalty: float | None = None  # subtracted from the last token of responses cut by length
    # Use the sampler's log-probs as PPO's old log-probs, saving one policy forward pass per update (not needed, and
    # not used, when reuse_first_epoch_forward applies: that path is exact and skips this pass too). Exact only
    # when sampling draws from the policy itself (top_k=0, top_p=1, no logits processors); the KV-cached
    # decode and the full forward then differ by float rounding only.
    reuse_sampling_logprobs: bool = False
    # Who runs the policy while sampling. "plain": transformers' own KV cache, any causal LM. "static":
    # tokencredit's preallocated KV cache, each decode step one CUDA graph on a GPU (Llama, Mistral, Qwen2,
    # Qwen3 layouts; same tokens as plain on CPU). "vllm": a vLLM engine that gets the policy's weights after
    # every update (`pip install "tokencredit[vllm]"`, GPU only).
    rollout_backend: Literal["plain", "static", "vllm"] = "plain"
    cuda_graphs: bool = True  # static backend on CUDA: replay each decode step as a captured graph
    vllm_gpu_memory_utilization: float = 0.3  # share of GPU memory the vLLM engine may take (KV cache included)

    # --- optimisation ---
    # Forward passes (sampling, scoring, training) in bf16 under autocast, with fp32 trainable weights, optimiser
    # state, losses, log-probs and values; frozen weights (reference, LoRA base, frozen blocks) stored in bf16.
    # "auto" = "bf16" where bf16 matmuls are native (AMX / AVX512-BF16 CPUs, bf16 GPUs), else "no".
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    learning_rate: float = 1e-5  # policy
    critic_learning_rate: float | None = None  # None = learning_rate
    weight_decay: float = 0.0  # AdamW weight decay (policy and critic)
    adam_eps: float = 1e-8  # AdamW epsilon
    ppo_epochs: int = 4  # passes over each rollout batch
    mini_batch_size: int | None = None  # rows per optimiser step; None = batch_size
    gradient_accumulation_steps: int = 1  # micro-batches per optimiser step (bounds memory)
    max_grad_norm: float | None = 1.0  # None = no clipping
    fused_optimizer: bool = True  # AdamW's fused kernel (one pass over all parameters) where torch has it
    # On a CPU under glibc: keep freed buffers in the process (mallopt) so each step's activations and gradients
    # are not faulted in from the kernel again; process-wide, see tokencredit.precision.tune_cpu_allocator. Off by
    # default: alone it made a PPO update 8% faster here, with the other levers on it changed nothing measurable.
    tune_allocator: bool = False
    # When one optimiser step covers the whole batch (mini_batch_size = batch_size, no accumulation) and dropout
    # is off, the first epoch's forward pass *is* the old policy and old critic: take old log-probs and values
    # from it (detached) instead of two extra no-grad passes. Exact, not an approximation.
    reuse_first_epoch_forward: bool = True
    # The value head sits on the policy's own trunk (its last hidden states) instead of a separate critic model:
    # one forward and backward per step instead of two, and no second backbone in memory. The value loss then also
    # trains the policy's (trainable) trunk, as in value-head PPO implementations; a different method from the
    # separate critic, so off by default. `critic=` cannot be passed with it.
    shared_critic: bool = False
    disable_dropout: bool = True  # dropout would make the PPO ratio != 1 before any update

    # --- PPO ---
    gamma: float = 1.0  # discount over response tokens
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # policy ratio clip
    cliprange_value: float | None = 0.2  # value clip around rollout values; None = unclipped
    vf_coef: float = 0.1  # weight of the value loss
    entropy_coef: float = 0.0  # entropy bonus
    whiten_advantages: bool = True  # normalise advantages to mean 0, variance 1 over the batch's trained tokens
    whiten_rewards: bool = False  # scale token rewards to unit variance (mean kept) before GAE
    target_kl: float | None = None  # stop this update's epochs once the approximate KL exceeds it
    target_coef: float = 0.0  # weight of NLL on reference responses (TRIL's "target" term); needs them

    # --- KL to the reference ---
    kl_coef: float = 0.05  # beta; the initial value when adaptive_kl
    # estimator of KL_t in the reward (k1 unbiased, k2 low variance, k3 unbiased and >= 0); None = k1
    kl_estimator: Literal["k1", "k2", "k3"] | None = None
    # True: r_t -= beta*KL_t. False: beta*KL as a loss term, the importance-weighted k2 of rl.kl.kl_loss, whose
    # gradient is that of KL(pi||ref) (k1's is zero, k3's is KL(ref||pi)'s, so kl_estimator must stay None)
    kl_in_reward: bool = True
    adaptive_kl: bool = False  # steer beta towards kl_target
    kl_target: float = 6.0  # target KL per sequence (sum over tokens) for the adaptive controller
    kl_horizon: int = 10000  # samples over which the adaptive controller reacts

    # --- learning with a guide (RLGF, see tokencredit.rl.guided); PPOTrainer(..., guide=...) ---
    # "ppo": no guide. "ppo_pp": the guide rolls in, the learner rolls out (losses on the learner's tokens).
    # "aggrevated": the learner rolls in, the guide rolls out (policy loss on the learner's prefix; a separate
    # guide critic learns the guide's cost-to-go on its continuation). "lols": each update ppo_pp with probability
    # lols_tau, else aggrevated. "d2lols": aggrevated until d2lols_switch_update, then ppo_pp.
    algorithm: Literal["ppo", "ppo_pp", "aggrevated", "lols", "d2lols"] = "ppo"
    # share of rows that switch writer at h ~ U{1..m-1}, m = the roll-in's own length; the other rows are the
    # roll-out policy's alone (plain learner rows under PPO++, whole guide answers under AggreVaTeD)
    guide_beta: float = 0.5
    guide_rollin_length: int | None = None  # cap on m; None = max_new_tokens
    lols_tau: float = 0.8  # LOLS: probability of a PPO++ update
    d2lols_switch_update: int | None = None  # D2LOLS: first update (0-based) that is PPO++
    guide_temperature: float = 1.0  # the guide's sampling (token-level guides)
    guide_top_p: float = 1.0  # nucleus sampling for the guide (token-level guides); 1.0 = off
    guide_top_k: int = 0  # top-k sampling for the guide (token-level guides); 0 = off (TRIL's guides: 50)
    # also count guide-written tokens in the KL penalty (they are not the policy's actions); TRIL's PPO++ and
    # AggreVaTeD train on the task reward alone, with no KL term on any token
    guide_kl: bool = False

    def validate(self) -> None:
        """Check ranges and divisibility; raise ValueError naming the field."""
        self.validate_run()
        positive = ("batch_size", "num_updates", "max_new_tokens", "ppo_epochs", "gradient_accumulation_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        mb = self.mini_batch_size or self.batch_size
        if self.batch_size % mb:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of mini_batch_size {mb}")
        if mb % self.gradient_accumulation_steps:
            raise ValueError(
                f"mini_batch_size {mb} must be a multiple of gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps}"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature})")
        if self.reuse_sampling_logprobs and (self.top_k or self.top_p < 1):
            raise ValueError("reuse_sampling_logprobs needs top_k=0 and top_p=1: filtered sampling log-probs are "
                             "not the policy's")
        if self.rollout_backend not in ("plain", "static", "vllm"):
            raise ValueError(f"rollout_backend must be 'plain', 'static' or 'vllm' (got {self.rollout_backend!r})")
        if self.rollout_backend == "vllm" and self.reuse_sampling_logprobs:
            raise ValueError("reuse_sampling_logprobs cannot be used with rollout_backend='vllm': vLLM's kernels "
                             "give other log-probs than the training forward pass")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma and lam must be in [0, 1] (got {self.gamma}, {self.lam})")
        if self.cliprange <= 0:
            raise ValueError(f"cliprange must be > 0 (got {self.cliprange})")
        if self.kl_estimator not in (None, "k1", "k2", "k3"):
            raise ValueError(f"kl_estimator must be 'k1', 'k2', 'k3' or None (got {self.kl_estimator!r})")
        if not self.kl_in_reward and self.kl_estimator is not None:
            raise ValueError(
                f"kl_estimator={self.kl_estimator!r} with kl_in_reward=false: as a loss term the KL uses the "
                "importance-weighted k2 (rl.kl.kl_loss), the one estimator whose gradient is that of KL(pi||ref) "
                "(k1's expected gradient is zero, k3's follows KL(ref||pi)); leave kl_estimator unset"
            )
        if self.kl_coef < 0 or self.learning_rate <= 0:
            raise ValueError("kl_coef must be >= 0 and learning_rate > 0")
        validate_mixed_precision(self.mixed_precision)
        self._validate_guide()

    def _validate_guide(self) -> None:
        """The RLGF fields: names, ranges and what guided rollouts cannot be combined with."""
        from tokencredit.rl.guided import ALGORITHMS

        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)} (got {self.algorithm!r})")
        if not 0.0 <= self.guide_beta <= 1.0:
            raise ValueError(f"guide_beta must be in [0, 1] (got {self.guide_beta})")
        if not 0.0 <= self.lols_tau <= 1.0:
            raise ValueError(f"lols_tau must be in [0, 1] (got {self.lols_tau})")
        if self.algorithm == "d2lols" and (self.d2lols_switch_update is None or self.d2lols_switch_update < 0):
            raise ValueError("algorithm='d2lols' needs d2lols_switch_update >= 0 (the first PPO++ update)")
        rollin_length = self.guide_rollin_length or self.max_new_tokens
        if self.algorithm != "ppo":
            if not 2 <= rollin_length <= self.max_new_tokens:
                raise ValueError(f"guide_rollin_length must be in [2, max_new_tokens] (got {rollin_length})")
            if self.guide_temperature <= 0 or not 0 < self.guide_top_p <= 1 or self.guide_top_k < 0:
                raise ValueError("guide_temperature must be > 0, guide_top_p in (0, 1] and guide_top_k >= 0")
            for name, bad in (("reuse_sampling_logprobs", self.reuse_sampling_logprobs),
                              ("stop_strings", bool(self.stop_strings)),
                              ("rollout_backend='vllm'", self.rollout_backend == "vllm")):
                if bad:
                    raise ValueError(f"algorithm={self.algorithm!r} cannot be combined with {name}: guided rows "
                                     "are written by two models through tokencredit's own sampler")
            if self.shared_critic and self.algorithm != "ppo_pp":
                raise ValueError(f"algorithm={self.algorithm!r} trains a separate guide critic; use "
                                 "shared_critic=false (ppo_pp works with either)")

    def uses_guide_critic(self) -> bool:
        """Whether some updates roll out with the guide, whose cost-to-go a separate critic learns."""
        return self.algorithm in ("aggrevated", "lols", "d2lols")

    def fuses_first_epoch(self) -> bool:
        """Whether old log-probs and values come from the first epoch's forward pass (see the field's comment)."""
        mb = self.mini_batch_size or self.batch_size
        return (self.reuse_first_epoch_forward and self.disable_dropout and mb == self.batch_size
                and self.gradient_accumulation_steps == 1)
