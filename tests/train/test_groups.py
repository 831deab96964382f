"""Groups of samples of one prompt (sampling.samples_per_prompt): how a micro-batch is laid out, what the data order
gives them, the leave-one-out baseline they make possible, and what is refused."""

import pytest
import torch

from kltd.objectives.losses import baseline_values, prefix_loss
from kltd.schema.config import Config, ConfigError
from tests.support.tiny_models import make_tiny_model
from tests.train.test_trainer import make_trainer

LOO = dict(prefix__source="student", trajectory__supervisor="student", loss__kl_prefix_weight=1.0,
           loss__normalization="sequence", loss__baseline="leave_one_out", sampling__samples_per_prompt=4,
           trainer__batch_size=8)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return str(make_tiny_model(root / "teacher", layers=2, seed=1)), str(make_tiny_model(root / "student", seed=2))


def test_a_micro_batch_holds_whole_groups_of_distinct_samples(model_dirs):
    trainer = make_trainer(model_dirs, **LOO)
    order = trainer.order.peek(4)  # two micro-batches of two prompts each
    first, _ = trainer.next_states(0)
    second, _ = trainer.next_states(1)
    for batch, prompts in ((first, order[:2]), (second, order[2:])):
        assert [e.prompt for e in batch.examples] == [trainer.examples[i].prompt for i in prompts for _ in range(4)]
    rows = [tuple(r[m].tolist()) for r, m in zip(first.responses.tokens, first.responses.mask)]
    assert len(set(rows[:4])) > 1  # each sample of a prompt has its own noise
    assert trainer.examples_per_step == 2 and trainer.order.position == 4


def test_the_leave_one_out_baseline_averages_the_other_samples_of_the_same_prompt(model_dirs):
    """The trainer's prefix term equals prefix_loss with groups of 4, which differs from groups of 1 (baseline 0)."""
    trainer = make_trainer(model_dirs, **LOO)
    batch, _ = trainer.next_states(0)
    trainer.student.train()
    _, parts = trainer.loss(batch, denominator=8.0)
    with torch.no_grad():
        student = trainer.scorers["student"].logits(trainer.student, batch)
        teacher = trainer.scorers["teacher"].logits(trainer.teacher, batch)

    def by_hand(group_size: int) -> float:
        return float(prefix_loss(student, teacher, batch.responses.tokens, batch.supervised, states="student",
                                 baseline="leave_one_out", group_size=group_size, normalization="sequence",
                                 denominator=8.0, score_mask=batch.student_written))

    assert parts["loss_prefix"] == pytest.approx(by_hand(4), rel=1e-5, abs=1e-6)
    assert abs(by_hand(4) - by_hand(1)) > 1e-3
    # the baseline itself: a group's other three rows' mean at each position they reach
    returns = torch.tensor([[4.0, 1.0], [2.0, 0.0], [6.0, 3.0], [0.0, 5.0]], dtype=torch.float64)
    reach = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    # (row 1 does not reach position 1: its baseline there is the mean of the three rows that do)
    assert baseline_values(returns, reach, "leave_one_out", 4).tolist() == [[8 / 3, 4.0], [10 / 3, 3.0],
                                                                           [2.0, 3.0], [4.0, 2.0]]


def grouped(**changes) -> Config:
    cfg = Config()
    cfg.prefix.source, cfg.trajectory.supervisor = "student", "student"
    cfg.loss.kl_prefix_weight, cfg.loss.normalization, cfg.loss.baseline = 1.0, "sequence", "leave_one_out"
    cfg.sampling.samples_per_prompt, cfg.trainer.batch_size = 4, 8
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.mark.parametrize("changes, message", [
    (dict(sampling__samples_per_prompt=1), "averages the other samples of the same prompt; draw several"),
    (dict(trainer__batch_size=6), "not a whole number of groups of sampling.samples_per_prompt=4"),
    (dict(prefix__source="mixed"), "needs every sample of a group written by the student"),
    (dict(prefix__source="fixed", trajectory__supervisor="expert", loss__kl_prefix_weight=0.0),
     "prefix=fixed samples none"),
    (dict(distributed__nproc_per_node=4), r"multiple of distributed.nproc_per_node=4 x sampling.samples_per_prompt=4"),
    (dict(sampling__samples_per_prompt=0), "sampling.samples_per_prompt=0 must be >= 1"),
])
def test_groups_that_cannot_be_formed_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        grouped(**changes).check()


def test_groups_are_accepted_where_they_can_be_formed():
    grouped().check()
    grouped(distributed__nproc_per_node=2).check()  # a group of 4 in each process
    grouped(loss__baseline="batch_mean", prefix__source="teacher", trajectory__supervisor="expert",
            loss__kl_prefix_weight=0.0).check()  # groups of teacher samples, no score-function term
