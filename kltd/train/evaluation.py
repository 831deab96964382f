"""Evaluation, identical for every cell: one set's questions, a fixed seed, exact per-token divergences.

The paper's figures per set: Avg@k (the mean accuracy of k samples per question), Pass@k (unbiased, from n >= k
samples), the mean response length and the share of responses the token budget cut (`truncated`), the student's
per-token entropy; greedy accuracy; each with a bootstrap interval over questions (kltd.report.bootstrap), and
the per-question values that paired comparisons of two runs need. Sequence-level KLs are sums of exact
per-token divergences over the response, so they have low variance: reverse KL(q||p) on student samples,
forward KL(p||q) on teacher samples.

A teacher served by another process (model.teacher_server) gives these through its server, in the training's form:
per position its top k tokens and a tail (kltd.objectives.topk_teacher), so each divergence is on k + 1 buckets: the
full one when k covers the vocabulary, a lower bound otherwise (the result's `teacher_served` says which). Its
samples are the server's draws of the same row noise as kltd's sampler; an OpenAI-compatible server samples with
its own stream, so with it only the figures on the student's samples are computed.

With `exact` (data=markov's chain: kltd.data.markov) the evaluation adds figures computed by scoring every response
(kltd.rollout.exact_kl), one per distinct prompt (a start state): `exact_reverse_kl`, `exact_forward_kl`, the
student's and teacher's entropy rates, the student's expected length, the probability that its response is cut at
the horizon (`exact_truncated`) and that the chain accepts it (`exact_accepted`). They carry no sampling noise, so
two runs differ in them only by what training did.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from kltd.objectives.divergences import DivergenceSpec, token_divergence
from kltd.objectives.topk_teacher import topk_teacher_divergence
from kltd.rollout.batch import StateBatch, decode_responses, encode_prompts
from kltd.rollout.grad_free import without_grad
from kltd.rollout.noise import RowNoise
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


def _per_token(scorers: dict, student, teacher, batch: StateBatch, spec: DivergenceSpec, sampled_by, served=None
               ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """[B, N] exact per-token divergence (None without a teacher) and student entropy at the response states (0 past
    the end).

    Both are computed on the response states alone ([M, V] logit rows, a part at a time: through the packed
    forward where the plan runs it, else the models' own forward; `scorers` by role) and scattered back into
    place. The model that sampled the responses (`sampled_by`) is not run again where its sampler kept the logits.
    `served` (teacher None): the served teacher's top k and tail at the same states, the divergence on k + 1 buckets.
    """
    mask = batch.supervised  # every response token: evaluation's batches supervise them all
    kept = batch.responses.logits

    def rows(model, role: str) -> LogitRows:
        if model is sampled_by and kept is not None:
            return LogitRows.of(kept[mask])
        return scorers[role].logit_rows(model, batch)

    q_rows = rows(student, "student")
    p_rows = rows(teacher, "teacher") if teacher is not None else None
    top = served.score(batch, spec.temperature, q_rows.width)[mask].packed() if p_rows is None and served else None
    divergence, entropy = [], []
    for part in q_rows.parts():
        q_logits = q_rows(part).float()
        log_q = torch.log_softmax(q_logits, -1)
        entropy.append(-(log_q.exp() * log_q).sum(-1))
        if p_rows is not None:
            divergence.append(token_divergence(q_logits, p_rows(part).float(), spec))
        elif top is not None:
            divergence.append(topk_teacher_divergence(q_logits, top[part], spec))
    scored = p_rows is not None or top is not None
    return (_in_place(divergence, mask) if scored else None), _in_place(entropy, mask)


def _in_place(rows: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Per-state values, row-major, -> [B, N] at the states `mask` marks, 0 elsewhere."""
    out = torch.zeros(mask.shape, device=mask.device)
    if rows:
        out[mask] = torch.cat(rows)
    return out


def pass_at_k(correct_by_prompt: list[list[bool]], k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) from n >= k samples per prompt."""
    return sum(question_pass_at_k(outcomes, k) for outcomes in correct_by_prompt) / len(correct_by_prompt)


def question_pass_at_k(outcomes: list[bool], k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that k of the n samples, drawn without replacement, hold a correct one."""
    n, c = len(outcomes), sum(outcomes)
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def questions_per_call(settings: EvalConfig, longest_prompt: int) -> int:
    """Questions per sampling call: eval.batch_size, fewer where their rows (x samples, prompt + budget tokens
    each) would pass eval.max_batch_tokens, so a long budget does not run out of memory."""
    row_tokens = (longest_prompt + settings.max_new_tokens) * settings.n_samples
    return max(1, min(settings.batch_size, settings.max_batch_tokens // row_tokens))


def evaluate(student, teacher, tokenizer, examples: list, settings: EvalConfig, *,
             checker: Callable[[str, object], bool] | None, lean: bool = True, vocab: int | None = None,
             plan: EvaluationPlan | None = None, on_progress: Callable[[int, int], None] | None = None,
             engines: dict | None = None, exact=None, served=None) -> dict:
    """Avg@k, Pass@k, greedy accuracy, response length, truncation, entropy, sequence KLs and per-position curves,
    each with a bootstrap interval over questions.

    Uses the first `num_prompts` examples and a generator seeded from `settings.seed`, so every cell of
    a sweep is measured on the same prompts with the same random stream. `checker(response, example)`
    grades an answer (None: no accuracy, Avg@k or Pass@k; the other metrics need no checker). `teacher` None
    (or eval.kl false): no KL columns. How the models run is `plan` (the job's: kltd.rollout.plan), else the
    plan for `lean` (as sampling.lean_decoder in training: kltd's lean decoder and packed forward where a model
    allows them; False: the models' own forward throughout). `vocab` limits both models to the tokenizer's ids.
    `on_progress(done, total)` is told after each batch of prompts how many are done. `engines`: by role, the
    job's vLLM samplers (kltd.rollout.vllm_sampler.VllmSampler), for the roles the plan samples through vLLM.
    `exact`: the reference of the exact figures (its `horizon`, `eos_id` and `support()`: kltd.data.markov.MarkovChain);
    None, or no teacher: none. `served`: the client of a served teacher (kltd.rollout.remote_teacher; `teacher` None),
    which gives the KL figures in its top-k form; no exact figures.
    """
    examples = examples[: settings.num_prompts]
    longest = max(len(tokenizer.encode(e.prompt, add_special_tokens=False)) for e in examples)
    per_call = questions_per_call(settings, longest)
    rows = min(per_call, len(examples)) * settings.n_samples
    if plan is None:
        plan = evaluation_plan(student, teacher or student, lean=lean, rows=rows,
                               max_new_tokens=settings.max_new_tokens, vocab=vocab)
    plan = plan.at(rows, settings.max_new_tokens)  # this set's batches and budget
    models = (student,) if teacher is None else (student, teacher)
    served = served if settings.kl and teacher is None else None
    with without_grad(*models):
        samplers = _Samplers(student, teacher if settings.kl else None, tokenizer, settings.max_new_tokens, plan, vocab,
                             engines or {}, served)
        result = _evaluate(student, teacher if settings.kl else None, tokenizer, examples, settings, checker, samplers,
                           plan, vocab, per_call, on_progress, exact, served)
    if served is not None:
        result["teacher_served"] = served_label(served, vocab)
    return result


def served_label(served, vocab: int | None) -> dict:
    """What the KL figures of a served teacher are: full divergences, or lower bounds (k below the vocabulary)."""
    whole = served.top_k >= (vocab or served.info["vocab_size"])
    bound = "exact" if whole else (f"lower bound: k + 1 = {served.top_k + 1} buckets (the served teacher's top "
                                   f"{served.top_k} tokens and a tail), never above the full divergence")
    return {"url": served.url, "top_k": served.top_k, "kl": bound,
            "teacher_samples": not (served.info or {}).get("openai", False)}


class _Samplers:
    """The evaluation's three samplers, as the plan says: kltd's (its lean decoder or the model's own forward), or
    the job's vLLM engine for a role the plan samples through it (the engine's own seeds, drawn from the same
    generator, so a run is still reproducible)."""

    def __init__(self, student, teacher, tokenizer, budget: int, plan: EvaluationPlan, vocab, engines: dict,
                 served=None):
        def sampler(role: str, model, temperature: float, keep: bool):
            route = plan.student if role == "student" else plan.teacher
            if route.decoder != "vllm":
                return Sampler(model, tokenizer, budget, temperature=temperature, lean=route.decoder == "lean",
                               vocab=vocab, keep_logits=keep)
            if role not in engines:
                raise ValueError(f"the evaluation plan samples the {role} through vLLM, and the job gave no engine")
            return dataclasses.replace(engines[role], max_new_tokens=budget, temperature=temperature, top_p=1.0)

        keep = plan.keep_sampled_logits
        self.greedy = sampler("student", student, 0.0, False)
        self.student = sampler("student", student, 1.0, keep)
        self.teacher = sampler("teacher", teacher, 1.0, keep) if teacher is not None else None
        if served is not None and not served.info.get("openai"):  # an OpenAI server's draws are not kltd's: none
            from kltd.rollout.remote_teacher import RemoteSampler

            self.teacher = RemoteSampler(served, budget)


class _Questions:
    """Per-question figures as they are measured, and their means and intervals."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def add(self, name: str, values) -> None:
        self.values.setdefault(name, []).extend(float(v) for v in values)

    def summary(self, resamples: int, seed: int) -> dict:
        from kltd.report.bootstrap import interval

        means = {name: sum(v) / len(v) for name, v in self.values.items()}
        spans = {name: list(interval(v, resamples, seed)) for name, v in self.values.items()} if resamples else {}
        return {**means, "intervals": spans, "per_question": self.values}


def _ended(responses, eos_id: int | None) -> list[bool]:
    """Whether each response ended by itself (its end token), not by running out of budget."""
    lengths = responses.mask.sum(1)
    ends = []
    for row, length in zip(responses.tokens, lengths.tolist()):
        ends.append(length < responses.tokens.shape[1] or (eos_id is not None and int(row[length - 1]) == eos_id))
    return ends


def _evaluate(student, teacher, tokenizer, examples: list, settings: EvalConfig, checker, samplers: _Samplers,
              plan: EvaluationPlan, vocab, per_call: int, on_progress, exact=None, served=None) -> dict:
    scorers = {role: Scorer(packed=route.packed, vocab=vocab)
               for role, route in (("student", plan.student), ("teacher", plan.teacher))}
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    n, k, budget = settings.n_samples, settings.pass_k, settings.max_new_tokens
    greedy, student_sampler, teacher_sampler = samplers.greedy, samplers.student, samplers.teacher
    q = _Questions()
    curves = {"student_states": PositionCurve(), "teacher_states": PositionCurve()}
    generated = {"student": 0, "teacher": 0}
    for start in range(0, len(examples), per_call):
        chunk = examples[start : start + per_call]
        prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in chunk], device)

        if settings.greedy:
            answers = greedy(prompt_ids, prompt_mask, None)
            if checker is not None:
                q.add("accuracy", [checker(t, e) for t, e in zip(decode_responses(tokenizer, answers), chunk)])
            q.add("greedy_response_length", answers.mask.sum(1).tolist())
            generated["student"] += answers.num_tokens

        # n student samples per question: Avg@k, Pass@k, length, truncation, entropy and the reverse KL
        rep_ids, rep_mask = prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0)
        on_student = student_sampler(rep_ids, rep_mask, generator)
        if checker is not None:
            texts = decode_responses(tokenizer, on_student)
            outcomes = [[checker(texts[i * n + j], e) for j in range(n)] for i, e in enumerate(chunk)]
            q.add("avg_at_k", [sum(o) / n for o in outcomes])
            q.add("pass_at_k", [question_pass_at_k(o, k) for o in outcomes])
        lengths = on_student.mask.sum(1)
        q.add("response_length", lengths.float().view(len(chunk), n).mean(1).tolist())
        cut = torch.tensor([not e for e in _ended(on_student, tokenizer.eos_token_id)], dtype=torch.float)
        q.add("truncated", cut.view(len(chunk), n).mean(1).tolist())
        batch = StateBatch(rep_ids, rep_mask, on_student, on_student.mask)
        per_token, token_entropy = _per_token(scorers, student, teacher, batch, REVERSE, sampled_by=student,
                                              served=served)
        q.add("student_entropy", (token_entropy.sum(1) / lengths.clamp(min=1)).view(len(chunk), n).mean(1).tolist())
        generated["student"] += on_student.num_tokens
        if per_token is not None:
            q.add("reverse_kl_student_states", per_token.sum(1).view(len(chunk), n).mean(1).tolist())
            curves["student_states"].add(per_token, on_student.mask)
        if teacher_sampler is not None:
            # per-row noise (one draw from the generator, as a torch stream's seed would be): a served teacher
            # draws the same samples as the loaded one; a vLLM engine takes its seed from the generator
            noise = generator if plan.teacher.decoder == "vllm" else RowNoise.from_generator(generator, len(chunk))
            on_teacher = teacher_sampler(prompt_ids, prompt_mask, noise)
            batch = StateBatch(prompt_ids, prompt_mask, on_teacher)
            per_token, _ = _per_token(scorers, student, teacher, batch, FORWARD, sampled_by=teacher, served=served)
            q.add("forward_kl_teacher_states", per_token.sum(1).tolist())
            curves["teacher_states"].add(per_token, on_teacher.mask)
            generated["teacher"] += on_teacher.num_tokens
        if on_progress is not None:
            on_progress(start + len(chunk), len(examples))
    if exact is not None and teacher is not None:
        for name, values in exact_questions(student, teacher, tokenizer, examples, exact, vocab).items():
            q.add(name, values)
    student.train(was_training)
    return {
        **q.summary(settings.intervals, settings.seed),
        "questions": len(examples),
        "pass_k": k,
        "samples": n,
        "max_new_tokens": budget,
        "student_tokens_generated": generated["student"],
        "teacher_tokens_generated": generated["teacher"],
        # reverse KL(q||p) by position on student samples, forward KL(p||q) on teacher samples
        "divergence_by_position": {name: curve.means() for name, curve in curves.items() if curve.total},
    }


# name in metrics.json -> the kltd.rollout.exact_kl.SequenceFigures field (or property) it reports
EXACT_FIGURES = {"exact_reverse_kl": "reverse_kl", "exact_forward_kl": "forward_kl", "exact_accepted": "student_accepted",
                 "exact_student_entropy_rate": "student_entropy_rate",
                 "exact_teacher_entropy_rate": "teacher_entropy_rate", "exact_response_length": "student_length"}


def exact_questions(student, teacher, tokenizer, examples: list, exact, vocab) -> dict[str, list[float]]:
    """The exact figures of each distinct prompt, in order of first appearance (the evaluation's prompts repeat the
    start states; each state's figures are computed once and weigh once)."""
    from kltd.rollout.exact_kl import exact_sequence_figures

    support = torch.tensor(exact.support())
    figures = {}
    for example in examples:
        if example.prompt not in figures:
            ids = tokenizer.encode(example.prompt, add_special_tokens=False)
            figures[example.prompt] = exact_sequence_figures(student, teacher, ids, horizon=exact.horizon,
                                                             eos_id=exact.eos_id, vocab=vocab, support=support)
    out = {name: [getattr(f, field) for f in figures.values()] for name, field in EXACT_FIGURES.items()}
    out["exact_truncated"] = [1 - f.student_ends for f in figures.values()]
    return out


def sets_result(results: dict[str, dict]) -> dict:
    """One evaluation's figures on every set: the first set's figures at the top (where metrics.json has always
    kept them, so `kltd compare --metric accuracy` reads them), every set's under "sets"."""
    first, figures = next(iter(results.items()))
    return {**{k: v for k, v in figures.items() if k != "per_question"}, "set": first, "sets": results}


def logged_figures(result: dict) -> dict:
    """What metrics.jsonl and W&B get: eval/<metric> for the first set, eval/<set>/<metric> for each set."""
    def scalars(figures: dict) -> dict:
        return {k: v for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    logged = {f"eval/{k}": v for k, v in scalars(result).items()}
    for name, figures in (result.get("sets") or {}).items():
        logged.update({f"eval/{name}/{k}": v for k, v in scalars(figures).items()})
    return logged


def final_figures(result: dict, under: str = "final") -> dict:
    """The W&B run summary of the last evaluation: logged_figures under final/ (or `under`/) in place of eval/."""
    return {f"{under}/{k.removeprefix('eval/')}": v for k, v in logged_figures(result).items()}
