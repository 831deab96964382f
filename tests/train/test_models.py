"""Real architectures through the same loading code: padded embedding rows, any causal LM, the checks."""

import pytest
import torch

from kltd.data.addition import make_splits
from kltd.schema.config import Config
from kltd.train.models import enable_checkpointing, load_pair
from kltd.train.trainer import Trainer
from tests.support.fixtures import chat_tokenizer, tiny_model
from tests.support.tolerances import loss_bounds


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {arch: str(tiny_model(arch, root / arch, seed=i)) for i, arch in enumerate(("qwen2_padded", "qwen3", "gpt2"))}


def trainer_for(teacher: str, student: str, **changes) -> Trainer:
    cfg = Config()
    cfg.model.teacher, cfg.model.student, cfg.model.device, cfg.cache.teacher = teacher, student, "cpu", "off"
    cfg.sampling.max_new_tokens = 8
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    pair = load_pair(teacher, student, device="cpu", tokenizer=chat_tokenizer())
    return Trainer(cfg, pair, make_splits(0, 32, 0)[0])


def test_padded_teacher_rows_are_never_compared_or_sampled(pair_dirs):
    trainer = trainer_for(pair_dirs["qwen2_padded"], pair_dirs["qwen3"], prefix__source="teacher")
    vocab = len(chat_tokenizer())
    assert trainer.teacher.get_output_embeddings().weight.shape[0] == vocab + 7 and trainer.vocab == vocab
    with torch.no_grad():  # make the padded rows the teacher's favourites: they must still never be drawn
        trainer.teacher.get_output_embeddings().weight[vocab:] = 50 * trainer.teacher.get_output_embeddings().weight[0]
        trainer.teacher.model.norm.weight.fill_(1.0)
    batch, _ = trainer.states.build(trainer.next_examples(6), torch.Generator().manual_seed(0))
    assert int(batch.responses.tokens[batch.responses.mask].max()) < vocab
    assert trainer.scorers["teacher"].logits(trainer.teacher, batch).shape[-1] == vocab


@pytest.mark.parametrize("student", ["qwen3", "gpt2"])
def test_fused_loss_equals_the_logits_path_with_a_padded_teacher(pair_dirs, student):
    fused = trainer_for(pair_dirs["qwen2_padded"], pair_dirs[student], prefix__source="student")
    plain = trainer_for(pair_dirs["qwen2_padded"], pair_dirs[student], prefix__source="student",
                        trainer__fused_head=False)
    assert fused.can_fuse() and not plain.can_fuse()
    for trainer in (fused, plain):
        trainer.student.eval()  # GPT-2 has dropout: two passes in train mode differ by chance
    batch, _ = fused.states.build(fused.next_examples(5), torch.Generator().manual_seed(0))
    a, _ = fused.loss(batch, float(batch.supervised.sum()))
    b, _ = plain.loss(batch, float(batch.supervised.sum()))
    # float32's bound for two paths of the same sums
    tol, _ = loss_bounds(plain.student.config.to_dict(), plain.teacher.config.to_dict(), int(batch.supervised.sum()),
                         float(batch.supervised.sum()), float(b.detach()))
    assert abs(float(a.detach()) - float(b.detach())) <= tol


def test_bfloat16_models_give_a_float32_loss_and_a_step(pair_dirs):
    trainer = trainer_for(pair_dirs["qwen2_padded"], pair_dirs["qwen3"], prefix__source="student")
    trainer.student.to(torch.bfloat16)
    trainer.teacher.to(torch.bfloat16)
    batch, _ = trainer.states.build(trainer.next_examples(4), torch.Generator().manual_seed(0))
    loss, _ = trainer.loss(batch, float(batch.supervised.sum()))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_gradient_checkpointing_gives_the_same_gradients(pair_dirs):
    grads, tol = [], 0.0
    for checkpointing in (False, True):
        trainer = trainer_for(pair_dirs["qwen2_padded"], pair_dirs["qwen3"], prefix__source="fixed",
                              trainer__gradient_checkpointing=checkpointing)
        if checkpointing:
            enable_checkpointing(trainer.student)
            assert not trainer.plan.training["student"].packed  # checkpointing lives in the model's own forward
        batch, _ = trainer.states.build(trainer.next_examples(4), torch.Generator().manual_seed(0))
        trainer.student.train()
        loss, _ = trainer.loss(batch, float(batch.supervised.sum()))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.student.parameters() if p.grad is not None]))
        # the packed forward without checkpointing, the model's own with it: float32's bound, relative to the
        # gradients' scale
        tol = loss_bounds(trainer.student.config.to_dict(), trainer.teacher.config.to_dict(),
                          int(batch.supervised.sum()), float(batch.supervised.sum()), float(loss.detach()))[1]
    assert float((grads[0] - grads[1]).abs().max()) <= tol * float(grads[0].abs().max())
