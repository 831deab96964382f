"""Evaluation, identical for every cell: held-out prompts, a fixed seed, exact per-token divergences.

Sequence-level KLs are sums of exact per-token divergences over the response, so they have
low variance: reverse KL(q||p) on student samples, forward KL(p||q) on teacher samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kltd.objectives.divergences import DivergenceSpec, token_divergence
from kltd.rollout.batch import StateBatch, decode_responses, encode_prompts
from kltd.rollout.grad_free import without_grad
from kltd.rollout.plan import EvaluationPlan, evaluation_plan
from kltd.rollout.sampling import Sampler
from kltd.rollout.scoring import LogitRows, Scorer
from kltd.schema.config import EvalConfig

REVERSE = DivergenceSpec(name="reverse_kl")
FORWARD = DivergenceSpec(name="forward_kl")


class PositionCurve:
    """Running sum and count of a per-token quantity by response position."""

    # a position is reported while at least this share of the sequences reach it; past that a mean rests
    # on a handful of long responses and one of them can put a spike in the plot
    MIN_SHARE = 0.05

    def __init__(self):
        self.total, self.count = [], []

    def add(self, per_token: torch.Tensor, mask: torch.Tensor) -> None:
        sums, counts = (per_token * mask).sum(0).tolist(), mask.sum(0).tolist()
        for i, (s, c) in enumerate(zip(sums, counts)):
            if i == len(self.total):
                self.total.append(0.0)
                self.count.append(0)
            self.total[i] += s
            self.count[i] += int(c)

    def means(self) -> list[float]:
        """The mean at each position, up to the last one that MIN_SHARE of the sequences reach."""
        floor = max(1, math.ceil(self.MIN_SHARE * self.count[0])) if self.count else 1
        out = []
        for total, count in zip(self.total, self.count):
            if count < floor:
                break
            out.append(total / count)
        return out


def _per_token(scorers: dict, student, teacher, batch: StateBatch, spec: DivergenceSpec, sampled_by
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, N] exact per-token divergence and student entropy at the response states (0 past the end).

    Both are computed on the response states alone ([M, V] logit rows, a part at a time: through the packed
    forward where the plan runs it, else the models' own forward; `scorers` by role) and scattered back into
    place. The model that sampled the responses (`sampled_by`) is not run again where its sampler kept the logits.
    """
    mask = batch.supervised  # every response token: evaluation's batches supervise them all
    kept = batch.responses.logits

    def rows(model, role: str) -> LogitRows:
        if model is sampled_by and kept is not None:
            return LogitRows.of(kept[mask])
        return scorers[role].logit_rows(model, batch)

    q_rows, p_rows = rows(student, "student"), rows(teacher, "teacher")
    divergence, entropy = [], []
    for part in q_rows.parts():
        q_logits, p_logits = q_rows(part).float(), p_rows(part).float()
        log_q = torch.log_softmax(q_logits, -1)
        entropy.append(-(log_q.exp() * log_q).sum(-1))
        divergence.append(token_divergence(q_logits, p_logits, spec))
    return _in_place(divergence, mask), _in_place(entropy, mask)


def _in_place(rows: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Per-state values, row-major, -> [B, N] at the states `mask` marks, 0 elsewhere."""
    out = torch.zeros(mask.shape, device=mask.device)
    if rows:
        out[mask] = torch.cat(rows)
    return out


def pass_at_k(correct_by_prompt: list[list[bool]], k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) from n >= k samples per prompt."""
    total = 0.0
    for outcomes in correct_by_prompt:
        n, c = len(outcomes), sum(outcomes)
        total += 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)
    return total / len(correct_by_prompt)


def evaluate(student, teacher, tokenizer, examples: list, settings: EvalConfig, *,
             checker: Callable[[str, object], bool] | None, lean: bool = True, vocab: int | None = None,
             plan: EvaluationPlan | None = None, on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Greedy accuracy, pass@k, response length, sequence KLs, entropy and per-position curves.

    Uses the first `num_prompts` examples and a generator seeded from `settings.seed`, so every cell of
    a sweep is measured on the same prompts with the same random stream. `checker(response, example)`
    grades an answer (None: no accuracy or pass@k, the other metrics need no checker). How the models run is
    `plan` (the job's: kltd.rollout.plan), else the plan for `lean` (as sampling.lean_decoder in training:
    kltd's lean decoder and packed forward where a model allows them; False: the models' own forward
    throughout). `vocab` limits both models to the tokenizer's ids. `on_progress(done, total)` is told after
    each batch of prompts how many are done.
    """
    examples = examples[: settings.num_prompts]
    if plan is None:
        plan = evaluation_plan(student, teacher, lean=lean, rows=min(settings.batch_size, len(examples)) *
                               max(1, settings.pass_k), max_new_tokens=settings.max_new_tokens, vocab=vocab)
    with without_grad(student, teacher):
        return _evaluate(student, teacher, tokenizer, examples, settings, checker, plan, vocab, on_progress)


def _evaluate(student, teacher, tokenizer, examples: list, settings: EvalConfig, checker, plan: EvaluationPlan,
              vocab, on_progress) -> dict:
    scorers = {role: Scorer(packed=route.packed, vocab=vocab)
               for role, route in (("student", plan.student), ("teacher", plan.teacher))}
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    k = max(1, settings.pass_k)
    keep = plan.keep_sampled_logits
    lean = {"student": plan.student.decoder == "lean", "teacher": plan.teacher.decoder == "lean"}
    greedy = Sampler(student, tokenizer, settings.max_new_tokens, temperature=0.0, lean=lean["student"], vocab=vocab)
    student_sampler = Sampler(student, tokenizer, settings.max_new_tokens, temperature=1.0, lean=lean["student"],
                              vocab=vocab, keep_logits=keep)
    teacher_sampler = Sampler(teacher, tokenizer, settings.max_new_tokens, temperature=1.0, lean=lean["teacher"],
                              vocab=vocab, keep_logits=keep)
    correct, lengths, rkl, fkl, entropy, sampled_correct = [], [], [], [], [], []
    curves = {"student_states": PositionCurve(), "teacher_states": PositionCurve()}
    generated = {"student": 0, "teacher": 0}
    for start in range(0, len(examples), settings.batch_size):
        chunk = examples[start : start + settings.batch_size]
        prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in chunk], device)

        answers = greedy(prompt_ids, prompt_mask, None)
        if checker is not None:
            correct += [checker(t, e) for t, e in zip(decode_responses(tokenizer, answers), chunk)]
        lengths += answers.mask.sum(1).tolist()
        generated["student"] += answers.num_tokens

        # k student samples per prompt: pass@k, and the reverse KL averaged over all of them
        rep_ids, rep_mask = prompt_ids.repeat_interleave(k, 0), prompt_mask.repeat_interleave(k, 0)
        on_student = student_sampler(rep_ids, rep_mask, generator)
        if checker is not None:
            texts = decode_responses(tokenizer, on_student)
            sampled_correct += [[checker(texts[i * k + j], e) for j in range(k)] for i, e in enumerate(chunk)]
        batch = StateBatch(rep_ids, rep_mask, on_student, on_student.mask)
        per_token, token_entropy = _per_token(scorers, student, teacher, batch, REVERSE, sampled_by=student)
        rkl += per_token.sum(1).view(len(chunk), k).mean(1).tolist()
        entropy += (token_entropy.sum(1) / on_student.mask.sum(1).clamp(min=1)).view(len(chunk), k).mean(1).tolist()
        curves["student_states"].add(per_token, on_student.mask)
        generated["student"] += on_student.num_tokens

        on_teacher = teacher_sampler(prompt_ids, prompt_mask, generator)
        batch = StateBatch(prompt_ids, prompt_mask, on_teacher)
        per_token, _ = _per_token(scorers, student, teacher, batch, FORWARD, sampled_by=teacher)
        fkl += per_token.sum(1).tolist()
        curves["teacher_states"].add(per_token, on_teacher.mask)
        generated["teacher"] += on_teacher.num_tokens
        if on_progress is not None:
            on_progress(start + len(chunk), len(examples))
    student.train(was_training)
    n = len(examples)
    graded = {"accuracy": sum(correct) / n, "pass_at_k": pass_at_k(sampled_correct, k)} if checker else {}
    return {
        **graded,
        "pass_k": k,
        "response_length": sum(lengths) / n,
        "reverse_kl_student_states": sum(rkl) / n,
        "forward_kl_teacher_states": sum(fkl) / n,
        "student_entropy": sum(entropy) / n,
        "student_tokens_generated": generated["student"],
        "teacher_tokens_generated": generated["teacher"],
        # reverse KL(q||p) by position on student samples, forward KL(p||q) on teacher samples
        "divergence_by_position": {name: curve.means() for name, curve in curves.items()},
    }
