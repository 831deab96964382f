"""Data parallelism (kltd.train.data_parallel) against one process, on the CPU with gloo: N processes with
B/N rows each take the steps one process takes with B rows, and a run resumes on another process count.

How closely two such runs agree follows from float32 arithmetic (tests/support/tolerances.py), not from a
quiet run. At the first step where they differ in process count, the weights are the same and only the
order and blocking of the float32 sums differ (each process sums its rows, gloo adds the partial sums; a
matmul over 4 rows rounds differently from one over 8): the loss and the step's (clipped) gradient agree to
the float32 bound of what the step sums. AdamW then magnifies that noise in any gradient component within
float noise of zero (its update g / (|g| + eps) turns a 1e-10 difference into 1e-6 and more; measured: one
weight of 132k differing by 1.5e-6 after step 1, up to 7.8e-6 after 5 steps on other seeds), and the later
steps start from weights that differ there: their losses agree to the same float32 bound plus the first-order
change the weight difference can make (gradient norm x weight distance; MiniLLM's gradient norms run to
thousands, so its loss moved by up to 1.5e-5 of itself with another CPU's kernels, which a fixed 1e-5 failed
on), and the final weights to what AdamW's steps can move a weight at all (lr x steps). The gradient check is
what catches a missing all-reduce (the losses alone would not); the loss checks catch a wrong denominator, a
baseline or a filter that sees one process's rows.
"""

import json
import math
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kltd.schema.config import Config, ConfigError
from kltd.train.job import train_job
from kltd.train.trainer import TrainingError, lr_lambda
from tests.support.tolerances import U, adam_drift_bound, divergence_magnitude, gamma, llama_chain, two_orders

# every case here has a teacher, live or cached: the student and the teacher each score every trained token
SCORED_PER_TOKEN = 2


def config(prefix: str, trajectory: str, *, nproc: int, cache: Path, accum: int = 1, steps: int = 5,
           **trainer) -> Config:
    cfg = Config()
    cfg.prefix.source, cfg.trajectory.supervisor = prefix, trajectory
    cfg.model.device, cfg.wandb.mode, cfg.cache.dir = "cpu", "disabled", str(cache)
    cfg.data.n_train, cfg.data.n_eval = 200, 8
    cfg.eval.num_prompts, cfg.eval.batch_size, cfg.eval.pass_k, cfg.eval.before = 4, 4, 2, False
    cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.trainer.grad_accum = steps, 8, accum
    cfg.trainer.log_every, cfg.trainer.progress, cfg.trainer.lr = 1, False, 3e-3
    # every step's weights and optimiser state, for assert_same_run
    cfg.trainer.checkpoint_every, cfg.trainer.keep_checkpoints = 1, steps
    cfg.distributed.nproc_per_node = nproc
    for key, value in trainer.items():
        setattr(cfg.trainer, key, value)
    return cfg


@dataclass
class Run:
    cfg: Config
    dir: Path
    rows: list[dict]  # metrics.jsonl's training lines, one a step
    weights: dict  # the final checkpoint's
    # sum of |per-token terms| / denominator of the loss parts by step, measured where the run ran in this process
    magnitudes: dict[int, float] = field(default_factory=dict)

    @property
    def losses(self) -> list[float]:
        return [row["train/loss"] for row in self.rows]

    def step_weights(self, step: int) -> dict:
        if step == 0:
            return load_file(str(_toy_student() / "model.safetensors"))
        return load_file(str(self.dir / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))

    def optimizer(self, step: int) -> dict:
        return torch.load(self.dir / "checkpoints" / f"step-{step:06d}" / "trainer.pt", weights_only=False)["optimizer"]


def trained(cfg: Config, run_dir: Path) -> Run:
    magnitudes: dict[int, float] = {}
    with measured_terms(magnitudes):  # a one-process run runs here; the workers of a data-parallel one do not
        train_job(cfg, run_dir)
    return Run(cfg, run_dir, training_rows(run_dir), load_file(str(run_dir / "checkpoint" / "model.safetensors")),
               magnitudes)


def training_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "train/loss" in row]


@contextmanager
def measured_terms(record: dict[int, float]):
    """Records, by step, sum |x_t| / denominator for each normalised loss part (kltd.objectives.losses.normalize):
    the magnitude of the step's final sum over tokens. Parts of both signs (the prefix term's score-function
    surrogate: log q x advantage) add up to several times their value; the fused path's divergences are >= 0."""
    import kltd.objectives.losses as losses
    from kltd.train.trainer import Trainer

    plain_normalize, plain_step = losses.normalize, Trainer.step
    step = [0]

    def normalize(per_token, mask, how="token", denominator=None):
        size = plain_normalize(per_token.detach().abs(), mask, how, denominator)
        record[step[0]] = record.get(step[0], 0.0) + float(size)
        return plain_normalize(per_token, mask, how, denominator)

    def counted_step(self):
        step[0] = self.steps_done + 1
        return plain_step(self)

    losses.normalize, Trainer.step = normalize, counted_step
    try:
        yield record
    finally:
        losses.normalize, Trainer.step = plain_normalize, plain_step


def _chains(cfg: Config) -> tuple[int, int, int]:
    """(vocabulary, student chain, teacher chain): tolerances.llama_chain of each model's config.json."""
    from kltd.train.models import resolve_model_path

    configs = [json.loads((Path(resolve_model_path(m)) / "config.json").read_text())
               for m in (cfg.model.student, cfg.model.teacher)]
    return configs[0]["vocab_size"], llama_chain(configs[0]), llama_chain(configs[1])


def step_sums(ref: Run) -> list[tuple[int, float]]:
    """(terms, magnitude) of each step's loss in `ref`: its scored positions (cost/tokens_scored, both models)
    times the vocabulary plus the chains of both models' forward passes; the magnitude from the run's loss
    parts (or the measured |terms| where some have both signs) plus the 2 ln V a token's divergence can hide."""
    vocab, student, teacher = _chains(ref.cfg)
    t, scored_before, sums = ref.cfg.trainer, 0, []
    for step, row in enumerate(ref.rows, 1):
        scored = row["cost/tokens_scored"] - scored_before
        scored_before = row["cost/tokens_scored"]
        assert scored % SCORED_PER_TOKEN == 0
        tokens = scored // SCORED_PER_TOKEN
        denominator = tokens if ref.cfg.loss.normalization == "token" else t.batch_size * t.grad_accum
        parts = sum(abs(row.get(f"train/{k}", 0.0)) for k in ("loss_trajectory", "loss_prefix"))
        magnitude = divergence_magnitude(max(parts, ref.magnitudes.get(step, 0.0)), tokens / denominator, vocab)
        sums.append((scored * vocab + student + teacher, magnitude))
    return sums


def step_lrs(cfg: Config) -> list[float]:
    t = cfg.trainer
    factor = lr_lambda(t.warmup_steps, t.max_steps, t.min_lr_ratio)
    return [t.lr * factor(k) for k in range(t.max_steps)]


def distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))


def assert_same_run(ref: Run, other: Run, first_split: int = 1) -> None:
    """`other` took the steps of `ref` (a one-process run, whose loss terms were measured), identical up to step
    first_split - 1 and split differently across processes from step `first_split` on."""
    assert ref.cfg.trainer.weight_decay == 0  # adam_drift_bound's assumption
    steps = len(ref.rows)
    assert steps == len(other.rows) >= 5 and ref.weights.keys() == other.weights.keys()
    sums = step_sums(ref)
    _, student, _ = _chains(ref.cfg)
    for step in range(first_split, steps + 1):
        terms, magnitude = sums[step - 1]
        before_a, before_b = ref.step_weights(step - 1), other.step_weights(step - 1)
        if step == first_split:  # the same weights: only the order of the float32 sums differs
            assert all(torch.equal(before_a[k], before_b[k]) for k in before_a), step
        # first order: |L(w + dw) - L(w)| <= |grad L| |dw|, |grad L| the step's logged (unclipped) gradient norm
        moved = max(ref.rows[step - 1]["train/grad_norm"], other.rows[step - 1]["train/grad_norm"]) * distance(
            before_a, before_b)
        a, b = ref.losses[step - 1], other.losses[step - 1]
        # float32's bound for two orders of the step's sums (step_sums), plus what the weights' difference moves
        assert abs(a - b) <= two_orders(terms, magnitude) + moved, (step, a, b, two_orders(terms, magnitude), moved)
    # the gradient's per-token contributions cancel as much as the loss's terms do (it is their gradient): the
    # magnitude of its sums is its norm times sum |terms| / |loss| of that step
    row = ref.rows[first_split - 1]
    parts = sum(abs(row.get(f"train/{k}", 0.0)) for k in ("loss_trajectory", "loss_prefix"))
    cancelling = max(1.0, max(parts, ref.magnitudes.get(first_split, 0.0)) / abs(row["train/loss"]))
    _assert_same_gradient(ref, other, first_split, sums[first_split - 1][0] + student, cancelling)
    # the final weights: no further than AdamW can move a weight in the steps after the split (plus a rounding of
    # each weight at each step)
    drift = adam_drift_bound(step_lrs(ref.cfg)[first_split - 1:])
    for k in ref.weights:
        rounding = 2 * steps * U * float(ref.weights[k].abs().max())
        assert float((ref.weights[k] - other.weights[k]).abs().max()) <= drift + rounding, k


def _assert_same_gradient(ref: Run, other: Run, step: int, terms: int, cancelling: float) -> None:
    """The (clipped) gradient of the first split step, read from AdamW's first moment: m_k = b1 m_(k-1) + (1 - b1)
    g_k, with m_(k-1) the same in both runs. It sums what the loss sums plus the backward pass through the
    student; the clipping factor adds the relative error of the gradient norm (a sum over the largest
    parameter, then over parameters, then the scaling); the moment's own rounding (a lerp: at most 3u relative, per
    run) is added back. Compared
    norm-wise: |dg_i| <= 2 gamma_n sum_t |c_ti| per component, and the vector of those sums has the norm
    `cancelling` x |g|."""
    state_a, state_b = ref.optimizer(step)["state"], other.optimizer(step)["state"]
    b1 = ref.optimizer(step)["param_groups"][0]["betas"][0]
    before = ref.optimizer(step - 1)["state"] if step > 1 else None
    if before is not None:
        again = other.optimizer(step - 1)["state"]
        assert all(torch.equal(before[i]["exp_avg"], again[i]["exp_avg"]) for i in before)
    m_a = torch.cat([state_a[i]["exp_avg"].double().flatten() for i in sorted(state_a)])
    m_b = torch.cat([state_b[i]["exp_avg"].double().flatten() for i in sorted(state_b)])
    previous = (torch.cat([before[i]["exp_avg"].double().flatten() for i in sorted(before)]) if before is not None
                else torch.zeros_like(m_a))
    g = (m_a - b1 * previous) / (1 - b1)
    difference = float((m_a - m_b).norm()) / (1 - b1)
    largest, tensors = max(s["exp_avg"].numel() for s in state_a.values()), len(state_a)
    bound = (two_orders(terms, cancelling * float(g.norm())) + gamma(largest + tensors + 2) * float(g.norm())
             + 3 * U * float(m_a.norm() + m_b.norm()) / (1 - b1))
    assert difference <= bound, (difference, bound)


@pytest.mark.parametrize("prefix,trajectory,accum", [("fixed", "expert", 1), ("fixed", "expert", 2),
                                                     ("student", "student", 1), ("student", "student", 2)])
def test_two_processes_take_the_steps_of_one(tmp_path, prefix, trajectory, accum):
    one = trained(config(prefix, trajectory, nproc=1, accum=accum, cache=tmp_path / "c1"), tmp_path / "one")
    two = trained(config(prefix, trajectory, nproc=2, accum=accum, cache=tmp_path / "c2"), tmp_path / "two")
    assert_same_run(one, two)
    start = load_file(str(_toy_student() / "model.safetensors"))
    # the steps did train: AdamW moves a weight whose gradient keeps its sign by about lr_k a step, and the five
    # steps' learning rates add up to 4.5e-3
    assert max(float((two.weights[k] - start[k]).abs().max()) for k in start) > 1e-3
    summary = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["eval_after"]["accuracy"] >= 0
    assert summary["tokens"]["trained"] == json.loads((tmp_path / "one" / "metrics.json").read_text())["tokens"][
        "trained"]  # an integer count: the same states, so exactly equal


@pytest.mark.parametrize("method", ["minillm", "minillm_leave_one_out", "offline_rl_filter"])
def test_terms_that_compare_a_row_with_the_whole_batch_span_the_processes(tmp_path, method):
    """The prefix term's batch_mean baseline and offline RL's filter weights see every process's rows; a
    leave-one-out group (4 samples of one prompt) stays whole in one process."""
    def cfg(nproc):
        prefix_term = method.startswith("minillm")
        c = config("student" if prefix_term else "fixed", "student" if prefix_term else "dataset",
                   nproc=nproc, cache=tmp_path / f"c{nproc}")
        if prefix_term:
            c.loss.kl_prefix_weight, c.loss.baseline, c.loss.normalization = 1.0, "batch_mean", "sequence"
            if method == "minillm_leave_one_out":
                c.loss.baseline, c.sampling.samples_per_prompt = "leave_one_out", 4
        else:
            c.trajectory.reward, c.trajectory.weighting, c.trajectory.keep_fraction = "teacher_loglik", "filter", 0.25
        return c

    # MiniLLM's sequence-normalised losses run to tens of nats, its score-function term has terms of both signs,
    # and its gradient norms run to thousands: all of it is in the bounds assert_same_run derives
    assert_same_run(trained(cfg(1), tmp_path / "one"), trained(cfg(2), tmp_path / "two"))


def _toy_student() -> Path:
    from kltd.train.models import resolve_model_path

    return Path(resolve_model_path(Config().model.student))


def cut_after(run: Path, step: int) -> None:
    """The run as if stopped after its step-`step` checkpoint: the summary, final model and later checkpoints go."""
    later = [p for p in (run / "checkpoints").glob("step-*") if int(p.name.split("-")[1]) > step]
    for done in (run / "metrics.json", run / "checkpoint", *later):
        shutil.rmtree(done) if done.is_dir() else done.unlink()


def test_a_run_resumes_on_another_number_of_processes(tmp_path):
    def cfg(nproc):
        return config("student", "student", nproc=nproc, steps=6, cache=tmp_path / "c")

    whole = trained(cfg(1), tmp_path / "whole")
    cut = tmp_path / "cut"  # the same run as if stopped after its step-3 checkpoint
    shutil.copytree(tmp_path / "whole", cut)
    cut_after(cut, 3)
    resumed = trained(cfg(2), cut)
    assert_same_run(whole, resumed, first_split=4)  # steps 1-3 are whole's own
    assert json.loads((cut / "metrics.json").read_text())["resumed_from_step"] == 3


def test_a_failure_in_the_processes_is_one_line_and_a_failed_summary(tmp_path):
    cfg = config("student", "student", nproc=2, cache=tmp_path / "c", lr=1e30, warmup_steps=0, max_grad_norm=1e30)
    with pytest.raises(TrainingError, match="at step") as failure:
        train_job(cfg, tmp_path / "run")
    assert "\n" not in str(failure.value)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("change,message", [
    (lambda c: setattr(c.trainer, "batch_size", 6), "multiple of distributed.nproc_per_node=4"),
    (lambda c: (setattr(c.loss, "kl_prefix_weight", 1.0), setattr(c.prefix, "source", "mixed")), "unevenly"),
    (lambda c: setattr(c.model, "teacher_device", "cpu"), "teacher_device"),
])
def test_what_data_parallelism_cannot_take_is_refused_before_anything_runs(change, message):
    cfg = config("student", "student", nproc=4, cache=Path("unused"))
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        cfg.check()


def test_each_process_takes_its_own_rows_of_the_global_batch():
    from kltd.train.ranks import Ranks

    assert [list(Ranks(r, 4).share(8)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert list(Ranks().share(8)) == list(range(8))


def test_two_processes_take_the_grpo_step_of_one(tmp_path):
    """An RL stage alone (from the toy student: the same weights in both runs), one GRPO step on two groups of four
    samples: two processes hold one whole group each, and the gradient is their sum. The samples are the same (the noise is keyed by the row's place
    in the global batch), so the rewards and lengths are equal exactly; the loss and the gradient (AdamW's first
    moment) agree to the float32 bound of what they sum."""
    def cfg(nproc):
        c = config("student", "expert", nproc=nproc, cache=tmp_path / f"c{nproc}", steps=0)
        c.trainer.keep_checkpoints = 1
        c.rl.algorithm, c.rl.steps, c.rl.group_size, c.rl.batch_size = "grpo", 1, 4, 8
        c.rl.reward = "tests.support.rewards:characters_mod_3"  # both groups have a gradient: each process's half counts
        return c

    runs = {}
    for nproc in (1, 2):
        train_job(cfg(nproc), tmp_path / str(nproc))
        row = next(r for r in training_rows_of(tmp_path / str(nproc), "rl/loss"))
        state = torch.load(tmp_path / str(nproc) / "checkpoints" / "step-000001" / "trainer.pt", weights_only=False)
        runs[nproc] = row, state["optimizer"]["state"]
    (one, m_one), (two, m_two) = runs[1], runs[2]
    assert one["rl/reward"] == two["rl/reward"] and one["rl/response_length"] == two["rl/response_length"]
    assert one["cost/tokens_trained"] == two["cost/tokens_trained"] and one["rl/grad_norm"] > 0
    tokens = one["cost/tokens_trained"]
    vocab, student, _ = _chains(cfg(1))
    # on-policy, every ratio is exactly 1: the loss sums -A_i over the tokens, |A_i| <= sqrt(G - 1) (std scaling)
    assert abs(one["rl/loss"] - two["rl/loss"]) <= two_orders(tokens, math.sqrt(3)), (one["rl/loss"], two["rl/loss"])
    # a weight's gradient: the log-softmax over the vocabulary at each token, the forward and backward chains, the
    # sum over tokens; relative to the gradient tensor's own scale (as tolerances.loss_bounds)
    relative = two_orders(tokens * vocab + 2 * student + tokens, 1.0)
    for i in m_one:
        a, b = m_one[i]["exp_avg"], m_two[i]["exp_avg"]
        assert float((a - b).abs().max()) <= relative * float(a.abs().max()) + 3 * U * float(a.abs().max()), i
    assert abs(one["rl/grad_norm"] - two["rl/grad_norm"]) <= relative * one["rl/grad_norm"]


def training_rows_of(run_dir: Path, key: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if key in row]


def test_two_processes_train_a_lora_adapter_as_one(tmp_path):
    """model.lora.r > 0 with DDP: only the adapter trains, its gradients are summed across the processes. At the first
    step (the same weights) the loss and the gradient (AdamW's first moment holds the adapter's only) agree to
    float32's bound for two orders of the step's sums; the final adapters no further apart than AdamW's steps move a
    weight."""
    pytest.importorskip("peft")
    runs = []
    for n in (1, 2):
        cfg = config("fixed", "expert", nproc=n, cache=tmp_path / f"c{n}")
        cfg.model.lora.r, cfg.model.lora.save_merged = 4, True
        runs.append(trained(cfg, tmp_path / f"p{n}"))
    one, two = runs
    terms, magnitude = step_sums(one)[0]
    assert abs(one.losses[0] - two.losses[0]) <= two_orders(terms, magnitude), (one.losses[0], two.losses[0])
    row = one.rows[0]
    parts = sum(abs(row.get(f"train/{k}", 0.0)) for k in ("loss_trajectory", "loss_prefix"))
    cancelling = max(1.0, max(parts, one.magnitudes.get(1, 0.0)) / abs(row["train/loss"]))
    _, student, _ = _chains(one.cfg)
    state = one.optimizer(1)["state"]
    assert len(state) == 2 * 2 * 7  # A and B of the 7 projections of both layers: nothing else is optimised
    _assert_same_gradient(one, two, 1, terms + student, cancelling)
    adapters = [load_file(str(run.dir / "adapter" / "adapter_model.safetensors")) for run in runs]
    drift = adam_drift_bound(step_lrs(one.cfg))
    for k in adapters[0]:
        rounding = 2 * len(one.rows) * U * float(adapters[0][k].abs().max())
        assert float((adapters[0][k] - adapters[1][k]).abs().max()) <= drift + rounding, k
    assert any(float(v.abs().max()) > 1e-3 for k, v in adapters[1].items() if "lora_B" in k)  # it trained
