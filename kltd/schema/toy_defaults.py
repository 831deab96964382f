"""The defaults that were tuned for the toy pair, and which of them a run on another pair would keep.

The schema's defaults run the embedded default: a 130k-parameter student that learns in seconds at lr 1e-3,
64-token answers, evaluation in batches of 200 prompts. On a pretrained pair the same learning rate collapsed a
135M student's entropy from 2.10 to 0.003 in 6 OPD steps. Presets for real pairs (conf/model/) carry their own
settings; a run that names its own models without one is told which toy defaults it kept.
"""

from __future__ import annotations

TOY_TUNED = ("trainer.lr", "trainer.batch_size", "sampling.max_new_tokens", "eval.max_new_tokens", "eval.batch_size",
             "rl.lr")
TOY_PREFIX = "toy/"


def _value(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def toy_defaults_kept(cfg, model_preset: str, given: set[str]) -> list[str]:
    """'key=value' for each toy-tuned setting a run keeps on a pair that is not the toy pair: the model preset is
    the toy one (model=toy, the default) and the key was not given on the command line. Empty otherwise."""
    own_pair = not (cfg.model.teacher.startswith(TOY_PREFIX) and cfg.model.student.startswith(TOY_PREFIX))
    if model_preset != "toy" or not own_pair:
        return []
    rl = cfg.rl.algorithm != "none"  # the RL stage's settings matter only where it runs
    return [f"{key}={_value(cfg, key):g}" for key in TOY_TUNED if key not in given and (rl or not key.startswith("rl."))]


def toy_defaults_line(kept: list[str]) -> str:
    return (f"model.teacher/model.student are not the toy pair, but {', '.join(kept)} "
            f"{'is' if len(kept) == 1 else 'are'} the toy pair's default{'s' if len(kept) > 1 else ''}; set "
            f"{'it' if len(kept) == 1 else 'them'} for your models, or start from model=pretrained (settings for "
            "pretrained models)")
