"""Loss parity for scripts/bench_vs_trl.py: kltd's loss values against TRL's on one batch and one set of logits.

At each scale, for fixed-prefix (expert) and student-prefix (student) states: kltd's trajectory_loss with
jsd(beta) against TRL's GKDTrainer.generalized_jsd_loss for beta in {0, 0.5, 1}; kltd's default divergence
of each (forward KL, reverse KL) against the matching beta; and the loss kltd's Trainer trains with (fused
head or logits) against generalized_jsd_loss and against DistillationTrainer's chunked loss. Each row is
(what, kltd, TRL, relative difference); the report holds each to bench_report.parity_tolerance, float32's bound at the scale's sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench_scales import SEED, Scale


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def parity(scale: Scale) -> list[tuple[str, float, float, float]]:
    """One batch, one set of logits: kltd's loss values against TRL's loss functions."""
    import torch
    from trl.experimental.gkd import GKDTrainer
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from kltd.schema.config import Config
    from kltd.objectives.divergences import DivergenceSpec
    from kltd.objectives.losses import trajectory_loss
    from kltd.train.models import load_pair
    from kltd.rollout.batch import position_ids_from_mask
    from kltd.rollout.scoring import Scorer
    from kltd.data.addition import Example
    from kltd.train.trainer import Trainer, seed_everything

    seed_everything(SEED)
    pair = load_pair(scale.teacher, scale.student, device="cpu")
    rows = json.loads(Path(scale.data).read_text())[: scale.batch_size]
    examples = [Example(r["prompt"], r["response"], 0) for r in rows]
    generalized_jsd = GKDTrainer.generalized_jsd_loss
    out = []
    for prefix, trajectory in (("fixed", "expert"), ("student", "student")):
        cfg = Config()
        cfg.prefix.source, cfg.trajectory.supervisor, cfg.cache.teacher = prefix, trajectory, "off"
        cfg.sampling.max_new_tokens = scale.max_new_tokens
        trainer = Trainer(cfg, pair, examples)
        batch, _ = trainer.states.build(examples, torch.Generator().manual_seed(SEED))
        targets, mask = batch.responses.tokens, batch.supervised
        labels = targets.masked_fill(~mask, -100)
        n, tokens = targets.shape[1], int(mask.sum())
        positions = position_ids_from_mask(batch.attention_mask)
        with torch.no_grad():
            s_logits, t_logits = Scorer().logits(pair.student, batch), Scorer().logits(pair.teacher, batch)
            # TRL's side gets the models' own forward ([B, n, H] at the response states), as TRL computes it
            s_hidden, t_hidden = (m.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                               position_ids=positions).last_hidden_state[:, -(n + 1) : -1]
                                  for m in (pair.student, pair.teacher))
        where = f"{prefix} states"
        default = "forward_kl" if trajectory == "expert" else "reverse_kl"
        beta_default = 0.0 if trajectory == "expert" else 1.0
        for beta in (0.0, 0.5, 1.0):
            trl = float(generalized_jsd(s_logits, t_logits, labels=labels, beta=beta))
            mine = float(trajectory_loss(s_logits, t_logits, targets, mask, trajectory=trajectory,
                                         spec=DivergenceSpec("jsd", beta=beta)))
            out.append((f"{where}: kltd trajectory_loss jsd({beta}) vs TRL generalized_jsd_loss", mine, trl,
                        rel(mine, trl)))
            if beta == beta_default:
                mine = float(trajectory_loss(s_logits, t_logits, targets, mask, trajectory=trajectory))
                out.append((f"{where}: kltd trajectory_loss {default} vs TRL generalized_jsd_loss({beta})", mine,
                            trl, rel(mine, trl)))
                # the loss each trainer actually trains with: kltd's fused head vs DistillationTrainer's chunks
                mine = float(trainer.loss(batch, float(tokens))[0].detach())
                with torch.no_grad():
                    theirs = float(_chunked_divergence_loss(
                        s_hidden, t_hidden, pair.student.get_output_embeddings().weight,
                        pair.teacher.get_output_embeddings().weight, mask.long(), beta)[0])
                path = "fused" if trainer.can_fuse() else "logits"
                out.append((f"{where}: kltd Trainer.loss ({path}) vs TRL generalized_jsd_loss({beta})", mine, trl,
                            rel(mine, trl)))
                out.append((f"{where}: kltd Trainer.loss vs TRL DistillationTrainer chunked loss({beta})", mine,
                            theirs, rel(mine, theirs)))
    return out
