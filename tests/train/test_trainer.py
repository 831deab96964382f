"""The shared trainer on tiny real models: fused vs reference loss, gradient accumulation, determinism."""

import copy

import pytest
import torch

from kltd.schema.config import Config
from kltd.train.models import load_pair
from kltd.data.addition import make_splits
from kltd.train.trainer import Trainer
from tests.support.tiny_models import make_tiny_model
from tests.support.tolerances import assert_same_gradients, loss_bounds


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return str(make_tiny_model(root / "teacher", width=32, layers=2, seed=1)), str(make_tiny_model(root / "student", seed=2))


@pytest.fixture(scope="module")
def tied_dirs(tmp_path_factory, model_dirs):
    """The same teacher with a student whose embedding is its output matrix (one parameter, two gradients)."""
    root = tmp_path_factory.mktemp("tied")
    return model_dirs[0], str(make_tiny_model(root / "student", seed=2, tied=True))


def make_trainer(model_dirs, **changes) -> Trainer:
    cfg = Config()
    cfg.model.teacher, cfg.model.student = model_dirs
    cfg.model.device = "cpu"
    cfg.sampling.max_new_tokens = 10
    cfg.cache.teacher = "off"
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    torch.manual_seed(0)
    pair = load_pair(cfg.model.teacher, cfg.model.student, device="cpu")
    train, _ = make_splits(0, 64, 4)
    return Trainer(cfg, pair, train)


def gradients(trainer: Trainer, batch, denominator) -> dict[str, torch.Tensor]:
    trainer.student.zero_grad(set_to_none=True)
    loss, _ = trainer.loss(batch, denominator)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.student.named_parameters() if p.grad is not None}


def tolerances(trainer: Trainer, batch, denominator: float, loss: float) -> tuple[float, float]:
    """(loss, gradient) bounds of tests/support/tolerances.loss_bounds for this trainer's pair and batch."""
    return loss_bounds(trainer.student.config.to_dict(), trainer.teacher.config.to_dict(),
                       int(batch.supervised.sum()), denominator, loss)


@pytest.mark.parametrize("cell", [
    dict(prefix__source="fixed", trajectory__supervisor="expert"),
    dict(prefix__source="student", trajectory__supervisor="student"),
    dict(prefix__source="mixed", trajectory__supervisor="expert", loss__divergence="jsd", loss__beta=0.3,
         loss__temperature=1.5, loss__normalization="sequence"),
])
def test_fused_head_equals_the_logits_path(model_dirs, cell):
    assert_fused_equals_the_logits_path(make_trainer(model_dirs, **cell),
                                        make_trainer(model_dirs, trainer__fused_head=False, **cell))


def test_a_tied_students_fused_head_equals_its_logits_path(tied_dirs):
    """Through the packed forward the tied embedding's gradient is added into the head's (the handoff of
    kltd.objectives.tied_gradient): the sum autograd forms on the logits path."""
    cell = dict(prefix__source="student", trajectory__supervisor="student")
    fused = make_trainer(tied_dirs, **cell)
    student = fused.student
    assert student.get_input_embeddings().weight is student.get_output_embeddings().weight
    assert fused.scorers["student"].packs(student)
    assert_fused_equals_the_logits_path(fused, make_trainer(tied_dirs, trainer__fused_head=False, **cell))


def assert_fused_equals_the_logits_path(fused: Trainer, reference: Trainer):
    assert fused.can_fuse() and not reference.can_fuse()
    batch, _ = fused.states.build(fused.next_examples(6), torch.Generator().manual_seed(0))
    denominator = float(batch.supervised.sum())
    loss_f, grads_f = gradients(fused, batch, denominator)
    loss_r, grads_r = gradients(reference, batch, denominator)
    loss_tol, grad_tol = tolerances(reference, batch, denominator, float(loss_r))
    assert abs(float(loss_f) - float(loss_r)) <= loss_tol
    assert_same_gradients(grads_f, grads_r, grad_tol)


@pytest.mark.parametrize("fused", [True, False])
def test_gradient_accumulation_matches_one_large_batch(model_dirs, fused):
    """Two micro-batches of 4 normalised by the step's token count give the gradient of one batch of 8.

    Compared as gradients (left in .grad after the step), not as the weights after AdamW's step: its update
    g / (|g| + eps) turns float noise in a gradient component near zero into up to 2 lr (tests/train/
    test_data_parallel.py)."""
    big = make_trainer(model_dirs, trainer__batch_size=8, trainer__fused_head=fused, trainer__max_grad_norm=1e9)
    small = make_trainer(model_dirs, trainer__batch_size=4, trainer__grad_accum=2, trainer__fused_head=fused,
                         trainer__max_grad_norm=1e9)
    before = copy.deepcopy(small.student.state_dict())
    stats = big.step()
    small.step()
    grads = [{n: p.grad for n, p in t.student.named_parameters() if p.grad is not None} for t in (big, small)]
    _, grad_tol = loss_bounds(big.student.config.to_dict(), big.teacher.config.to_dict(), stats.trained_tokens,
                              stats.trained_tokens, stats.loss)  # the step's sums over its 8 rows
    assert_same_gradients(grads[1], grads[0], grad_tol)
    assert any(not torch.equal(before[n], v) for n, v in small.student.state_dict().items())


def test_student_states_are_sampled_and_counted(model_dirs):
    trainer = make_trainer(model_dirs, prefix__source="student", trajectory__supervisor="expert")
    stats = trainer.step()
    assert stats.tokens.student_generated > 0 and stats.tokens.teacher_generated == 0
    assert trainer.teacher_forwards == 1


def test_nan_loss_stops_with_a_clear_error(model_dirs):
    from kltd.train.trainer import TrainingError

    trainer = make_trainer(model_dirs)
    with torch.no_grad():
        next(trainer.student.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingError, match="lower trainer.lr"):
        trainer.step()


def group_gradients(trainer: Trainer, parts, denominator):
    trainer.student.zero_grad(set_to_none=True)
    total = 0.0
    for part in parts:
        loss, _ = trainer.loss(part, denominator)
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.clone() for n, p in trainer.student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cell", [
    dict(prefix__source="fixed", trajectory__supervisor="expert"),
    dict(prefix__source="student", trajectory__supervisor="student", trainer__fused_head=False),
    dict(prefix__source="mixed", trajectory__supervisor="student", loss__normalization="sequence"),
    dict(prefix__source="fixed", trajectory__supervisor="dataset"),
])
def test_length_groups_give_the_gradient_of_the_whole_batch(model_dirs, cell):
    trainer = make_trainer(model_dirs, **cell)
    assert trainer.loss_is_sum_over_rows()
    batch, _ = trainer.states.build(trainer.next_examples(12), torch.Generator().manual_seed(0))
    parts = batch.by_length(4, overhead_tokens=0)
    assert len(parts) > 1 and sum(p.num_sequences for p in parts) == 12
    # each group is narrower than the batch (its own padding gone) and keeps every supervised token
    assert sum(int(p.supervised.sum()) for p in parts) == int(batch.supervised.sum())
    assert sum(p.input_ids.numel() for p in parts) < batch.input_ids.numel()
    denominator = float(batch.supervised.sum() if trainer.cfg.loss.normalization == "token" else 12)
    whole, grads_whole = group_gradients(trainer, [batch], denominator)
    split, grads_split = group_gradients(trainer, parts, denominator)
    loss_tol, grad_tol = tolerances(trainer, batch, denominator, whole)  # the same sums, grouped otherwise
    assert abs(split - whole) <= loss_tol
    assert_same_gradients(grads_split, grads_whole, grad_tol)


def test_selected_rows_keep_their_tokens_without_shared_padding(model_dirs):
    trainer = make_trainer(model_dirs, prefix__source="student", trajectory__supervisor="student")
    batch, _ = trainer.states.build(trainer.next_examples(8), torch.Generator().manual_seed(0))
    rows = [5, 1, 2]
    part = batch.select(rows)
    for j, i in enumerate(rows):
        def real(ids, mask):
            return ids[mask.bool()].tolist()
        assert real(part.input_ids[j], part.attention_mask[j]) == real(batch.input_ids[i], batch.attention_mask[i])
        assert part.examples[j] is batch.examples[i]
    assert part.prompt_mask[:, 0].any() and part.responses.mask[:, -1].any()  # no all-padding edge column


def test_batch_coupled_losses_are_not_split(model_dirs):
    assert not make_trainer(model_dirs, loss__kl_prefix_weight=1.0, prefix__source="student",
                            trajectory__supervisor="student").loss_is_sum_over_rows()
    assert not make_trainer(model_dirs, prefix__source="fixed", trajectory__supervisor="dataset",
                            trajectory__reward="correctness").loss_is_sum_over_rows()


def test_planned_examples_are_the_ones_training_draws(model_dirs):
    trainer = make_trainer(model_dirs, trainer__max_steps=7, trainer__batch_size=10, trainer__grad_accum=2)
    planned = trainer.planned_examples()
    drawn = [e for _ in range(7 * 2) for e in trainer.next_examples(10)]  # 140 draws: more than two epochs of 64
    assert [e.prompt for e in planned] == [e.prompt for e in drawn]
    assert len({e.prompt for e in drawn[:64]}) == 64  # each epoch is a permutation of the split


def test_handoff_prefix_term_returns_only_supervised_divergence_and_scores_the_roll_in(model_dirs):
    """prefix=mixed with a hand-off and supervise=after_handoff: the trainer's prefix term is the score
    function over the student's roll-in tokens with returns over the supervised positions only (the
    combination kltd.objectives.losses.prefix_loss is proven exact for in tests/objectives)."""
    from kltd.objectives.divergences import DivergenceSpec
    from kltd.objectives.losses import prefix_loss

    trainer = make_trainer(model_dirs, prefix__source="mixed", prefix__student_fraction=1.0, prefix__handoff=True,
                           prefix__handoff_k="fixed", prefix__handoff_k_value=3, prefix__supervise="after_handoff",
                           loss__kl_prefix_weight=1.0, loss__baseline="none", sampling__top_p=0.9)
    batch, _ = trainer.states.build(trainer.next_examples(6), torch.Generator().manual_seed(0))
    written, supervised = batch.student_written, batch.supervised
    assert written.any() and supervised.any() and not (written & supervised).any()
    student = trainer.scorers["student"].logits(trainer.student, batch)
    teacher = trainer.teacher_logits(batch)
    common = dict(normalization="token", denominator=float(supervised.sum()))
    got = trainer.prefix_term(batch, student, teacher, common)
    want = prefix_loss(student, teacher, batch.responses.tokens, supervised, states="student", baseline="none",
                       spec=DivergenceSpec("forward_kl"), score_mask=written, sampling_top_p=0.9, **common)
    # the same function of the same logits (no baseline, so no batch sums): allclose's default (1e-5) only
    # stands in for equality
    assert torch.allclose(got, want) and float(want.detach()) != 0.0


def test_a_non_finite_step_is_skipped_within_the_allowance_then_stops_the_run(model_dirs, monkeypatch):
    from kltd.train.trainer import TrainingError

    trainer = make_trainer(model_dirs, trainer__skip_bad_steps=1)
    plain = trainer.loss
    calls = []

    def sometimes_nan(batch, denominator):
        loss, parts = plain(batch, denominator)
        calls.append(1)
        return (loss * float("nan"), parts) if len(calls) in (2, 3) else (loss, parts)

    monkeypatch.setattr(trainer, "loss", sometimes_nan)
    trainer.step()
    before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    stats = trainer.step()  # the second step's loss is NaN: skipped, nothing updated
    assert stats.parts.get("skipped") == 1.0 and trainer.skipped_steps == 1
    assert all(torch.equal(before[n], p) for n, p in trainer.student.named_parameters())
    with pytest.raises(TrainingError, match="at step 3.*1 bad steps skipped"):
        trainer.step()
