"""The valid values of every enumerated config key, in one place.

The objectives and the trainer implement these names; the schema (kltd.schema.config) refuses anything
else before a model is loaded. Plain tuples: nothing here imports torch or Hydra.
"""

from __future__ import annotations

from kltd.schema.divergences import NAMES, one_token_estimators

PREFIXES = ("fixed", "teacher", "student", "mixed")
TRAJECTORIES = ("expert", "student", "dataset")

# Per-token divergences D(p, q), p = teacher, q = student: the divergence table (kltd.schema.divergences) has one
# entry each, with the one-token estimators defined for it (kltd.objectives.estimators says why).
DIVERGENCES = NAMES
ESTIMATORS = ("exact", "topk", "sampled_k1", "sampled_k2", "sampled_k3", "sampled_reward")
SAMPLED_ESTIMATORS = one_token_estimators()
NORMALIZATIONS = ("token", "sequence")
BASELINES = ("none", "batch_mean", "leave_one_out")
# the RL stage after distillation (kltd.schema.rl, kltd.objectives.grpo)
RL_ALGORITHMS = ("none", "grpo")
RL_BASELINES = ("group_mean", "leave_one_out")  # a sample's reward against its group's mean, or the others' mean
RL_SCALES = ("std", "none")  # advantages divided by the group's standard deviation, or not

# Offline RL (trajectory=dataset): a return per sequence, and how it weights the cross-entropy.
REWARDS = ("none", "correctness", "teacher_loglik")
WEIGHTINGS = ("none", "filter", "awr")

DATA_SOURCES = ("addition", "markov", "file", "hub")  # the built-in tasks, a local file or directory, a hub dataset
CHECKERS = ("auto", "none", "exact", "gsm8k", "boxed", "addition", "markov")
OVERFLOW = ("drop", "truncate")  # rows longer than data.max_prompt_tokens / data.max_response_tokens
CHAT_TEMPLATE = ("auto", "none")
EVAL_SET_SOURCES = ("heldout", "hub", "file")
BAD_ROWS = ("error", "drop")  # a row that does not fit, is empty or has an unreadable answer: refuse, or drop and count

MIXED_OTHER = ("fixed", "teacher")
SCHEDULES = ("constant", "linear")
MIX_SCHEDULES = ("constant", "linear", "cosine")  # loss.mix_schedule: kl_mix's weight over training
HANDOFF_K = ("fixed", "uniform", "geometric")
SUPERVISE = ("all", "after_handoff")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE_BASE = ("none", "4bit")  # model.lora.quantize_base: the frozen base of a LoRA student
WANDB_MODES = ("auto", "online", "offline", "disabled")
SAMPLING_BACKENDS = ("kltd", "vllm")
# sampling.length_schedule: the training horizon over training (kltd.rollout.horizon)
LENGTH_SCHEDULES = ("fixed", "steps", "entropy_gated")
DISTRIBUTED_STRATEGIES = ("ddp", "fsdp")
DISTRIBUTED_BACKENDS = ("auto", "gloo", "nccl")
CACHE_MODES = ("auto", "on", "off")
CACHE_FORMATS = ("full", "topk")
