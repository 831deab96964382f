"""Compute accounting (kltd.train.compute): the FLOP formula by hand on a tiny model, and a run's cost records."""

import json
import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from kltd.rollout.batch import Responses, StateBatch
from kltd.schema.axes import PrefixConfig
from kltd.schema.config import Config
from kltd.train.compute import PARTS, FlopCounter, ModelShape, forward_flops, sampling_flops, sequence_flops, \
    token_flops, training_flops
from kltd.train.job import train_job

# ---------------------------------------------------------------------------------------- the formula by hand

# vocabulary 50, hidden 32, MLP 80, 3 layers, 4 query heads of 8 dimensions and 2 key/value heads, untied head
LLAMA = dict(vocab_size=50, hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
# the matmul weights one token passes through in one block, as (inputs, outputs)
BLOCK = {"q_proj": (32, 4 * 8), "k_proj": (32, 2 * 8), "v_proj": (32, 2 * 8), "o_proj": (4 * 8, 32),
         "gate_proj": (32, 80), "up_proj": (32, 80), "down_proj": (80, 32)}
BLOCK_WEIGHTS = 1024 + 512 + 512 + 1024 + 2560 + 2560 + 2560  # = 10752
HEAD_WEIGHTS = 50 * 32  # the output layer: hidden -> vocabulary


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)  # eager attention: its two products are matmuls that torch's FLOP counter sees
    return LlamaForCausalLM(LlamaConfig(**LLAMA, attn_implementation="eager")).eval()


def test_the_block_weights_are_the_models_matmul_weights(llama):
    shape = ModelShape.of(llama)
    assert sum(a * b for a, b in BLOCK.values()) == BLOCK_WEIGHTS
    linear = [m for m in llama.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert sorted({name.split(".")[-1] for name, _ in llama.model.layers.named_modules()} & set(BLOCK)) == sorted(BLOCK)
    assert shape.non_embedding_params == 3 * BLOCK_WEIGHTS == sum(m.weight.numel() for m in linear)
    assert shape.vocab * shape.hidden == HEAD_WEIGHTS == llama.lm_head.weight.numel()
    assert (shape.layers, shape.heads, shape.kv_heads, shape.head_dim, shape.tied_head) == (3, 4, 2, 8, False)


def test_a_forward_by_hand(llama):
    shape = ModelShape.of(llama)
    per_token = 2 * (3 * BLOCK_WEIGHTS + HEAD_WEIGHTS)  # 2 FLOPs per multiply-add = 67,712
    attention = 2 * 2 * 3 * (4 * 8)  # scores and values, 3 layers, 32 query dimensions: 384 per context token
    assert (per_token, attention) == (67_712, 384)
    assert token_flops(shape, 7) == per_token + 7 * attention
    # a causal forward over 5 tokens: contexts 1, 2, 3, 4, 5
    assert sequence_flops(shape, [5]) == 5 * per_token + (1 + 2 + 3 + 4 + 5) * attention == 344_320
    assert sequence_flops(shape, torch.tensor([5, 2])) == 344_320 + 2 * per_token + 3 * attention
    assert forward_flops(shape, 5, 3.0) == 344_320  # the mean context of those 5 tokens is 3
    # a backward costs twice its forward: a training step over the 5 tokens
    trained = FlopCounter(student_train=3 * sequence_flops(shape, [5]))
    assert trained.total == 1_032_960


def test_the_matmuls_pytorch_counts_agree(llama):
    """torch's FLOP counter on the model's own forward: the same matmuls, and attention over the whole L x L square
    (it does not know the mask is causal) where the formula counts the causal contexts 1 .. L."""
    from torch.utils.flop_counter import FlopCounterMode

    shape, length = ModelShape.of(llama), 6
    with torch.no_grad(), FlopCounterMode(display=False) as counted:
        llama(torch.arange(length).unsqueeze(0))
    square = 2 * 2 * 3 * length * length * (4 * 8)
    causal = 2 * 2 * 3 * (length * (length + 1) // 2) * (4 * 8)
    assert counted.get_total_flops() == sequence_flops(shape, [length]) - causal + square


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft asks it
def test_a_lora_step_pytorch_counts_agree(llama):
    """A rank-2 adapter on every projection: torch's FLOP counter over a forward and backward against
    training_flops. Besides attention's square (forward and both gradients), the count differs from torch's by
    what autograd skips: the input gradients of the first block's q, k, v and their adapters' A (their input, the
    normed frozen embedding, needs none)."""
    peft = pytest.importorskip("peft")
    from torch.utils.flop_counter import FlopCounterMode

    rank, length = 2, 6
    model = peft.get_peft_model(LlamaForCausalLM(LlamaConfig(**LLAMA, attn_implementation="eager")),
                                peft.LoraConfig(r=rank, target_modules=list(BLOCK)))
    shape = ModelShape.of(model)
    assert shape.adapter == 3 * rank * sum(i + o for i, o in BLOCK.values())
    assert shape.adapter == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with FlopCounterMode(display=False) as counted:
        model(torch.arange(length).unsqueeze(0)).logits.sum().backward()
    square = 2 * 2 * 3 * length * length * (4 * 8)
    causal = 2 * 2 * 3 * (length * (length + 1) // 2) * (4 * 8)
    first_qkv = sum(i * o + rank * i for name, (i, o) in BLOCK.items() if name in ("q_proj", "k_proj", "v_proj"))
    assert counted.get_total_flops() == (training_flops(shape, [length]) + 3 * (square - causal)
                                         - 2 * first_qkv * length)
    # and a full step of the same model costs more: every weight's own gradient
    assert training_flops(shape, [length]) < 3 * sequence_flops(shape, [length])


def test_a_gpt2_shape_counts_its_two_matrix_mlp():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=50))
    shape = ModelShape.of(model)
    per_block = 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32  # c_attn (q, k, v), c_proj, c_fc, mlp.c_proj
    weights = [p.numel() for name, p in model.transformer.h.named_parameters()
               if name.endswith("weight") and p.dim() == 2]
    assert shape.non_embedding_params == 2 * per_block == sum(weights)
    assert shape.tied_head and shape.vocab == 50


def test_decoding_reads_each_token_once_at_its_context(llama):
    shape = ModelShape.of(llama)
    # two prompts of 3 and 2 tokens (left-padded to 3), responses of 4 and 1 tokens
    prompt_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    tokens = torch.ones(2, 4, dtype=torch.long)
    batch = StateBatch(torch.ones(2, 3, dtype=torch.long), prompt_mask, Responses(tokens, mask), student_written=mask)

    def by_hand(reads):  # one token-forward per token read, at contexts 1 .. reads
        return sum(token_flops(shape, c) for c in range(1, reads + 1))

    # the student read its prompt, then each of its tokens but the last: 3 + 3 and 2 + 0 tokens
    assert sampling_flops(batch, PrefixConfig(source="student"), shape, shape) == (by_hand(6) + by_hand(2), 0)
    teacher_batch = StateBatch(batch.prompt_ids, prompt_mask, batch.responses)
    assert sampling_flops(teacher_batch, PrefixConfig(source="teacher"), shape, shape) == (0, by_hand(6) + by_hand(2))
    assert sampling_flops(teacher_batch, PrefixConfig(source="fixed"), shape, shape) == (0, 0)
    # a hand-off: the student wrote 2 tokens of row 0 and the teacher the other 2 (row 1 is a fixed one)
    written = torch.tensor([[True, True, False, False], [False] * 4])
    handoff = StateBatch(batch.prompt_ids, prompt_mask, batch.responses, written,
                         student_rows=torch.tensor([True, False]))
    mixed = PrefixConfig(source="mixed", handoff=True)
    assert sampling_flops(handoff, mixed, shape, shape) == (by_hand(3 + 2 - 1), by_hand(3 + 4 - 1))
    # ... and when the other rows are the teacher's samples, row 1 is the teacher's too
    mixed.other = "teacher"
    assert sampling_flops(handoff, mixed, shape, shape) == (by_hand(4), by_hand(6) + by_hand(2))


# ---------------------------------------------------------------------------------------------- a run's costs

COST_KEYS = ("cost/flops", "cost/tokens_processed", "cost/wall_time_s")


def tiny_config(tmp_path, prefix: str, trajectory: str, cache: str = "off") -> Config:
    cfg = Config()
    cfg.prefix.source, cfg.trajectory.supervisor = prefix, trajectory
    cfg.model.device, cfg.wandb.mode = "cpu", "disabled"
    cfg.cache.teacher, cfg.cache.dir = cache, str(tmp_path / "cache")
    cfg.data.n_train, cfg.data.n_eval = 32, 8
    cfg.eval.num_prompts, cfg.eval.batch_size, cfg.eval.pass_k, cfg.eval.every = 4, 4, 2, 1
    t = cfg.trainer
    t.max_steps, t.batch_size, t.progress, t.save_checkpoint, t.num_threads = 3, 4, False, False, 1
    t.log_every, t.checkpoint_every, t.keep_checkpoints = 2, 1, 3  # step 1 is evaluated but not logged
    return cfg


def history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def merged(rows: list[dict]) -> dict[int, dict]:
    steps: dict[int, dict] = {}
    for row in rows:
        steps.setdefault(row["step"], {}).update(row)
    return steps


CELLS = {  # (prefix, trajectory, teacher cache): the parts that must be spent
    "fixed-expert-cached": ("fixed", "expert", "auto", {"student_train", "cache_fill"}),
    "fixed-expert-live": ("fixed", "expert", "off", {"student_train", "teacher_score"}),
    "student-student": ("student", "student", "off", {"student_train", "teacher_score", "student_sampling"}),
    "teacher-expert": ("teacher", "expert", "off", {"student_train", "teacher_score", "teacher_sampling"}),
}


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
    """The cell with the teacher cache, run straight through (also the reference of the resumed run)."""
    tmp = tmp_path_factory.mktemp("cached")
    prefix, trajectory, cache, _ = CELLS["fixed-expert-cached"]
    summary = train_job(tiny_config(tmp, prefix, trajectory, cache), tmp / "run")
    return tmp, tmp / "run", summary


@pytest.mark.parametrize("cell", list(CELLS))
def test_every_evaluated_step_has_its_cumulative_costs(cell, cached_run, tmp_path):
    prefix, trajectory, cache, spent = CELLS[cell]
    if cell == "fixed-expert-cached":
        _, run_dir, summary = cached_run
    else:
        run_dir = tmp_path / "run"
        summary = train_job(tiny_config(tmp_path, prefix, trajectory, cache), run_dir)
    steps = merged(history(run_dir))
    evaluated = [s for s, row in steps.items() if any(k.startswith("eval/") for k in row)]
    assert evaluated == [0, 1, 2, 3]
    for step in evaluated:
        assert all(key in steps[step] for key in COST_KEYS), (step, steps[step])
    assert steps[0]["cost/flops"] == steps[0]["cost/tokens_processed"] == 0
    flops = [steps[s]["cost/flops"] for s in evaluated]
    assert all(a < b for a, b in zip(flops, flops[1:])), flops
    tokens = [steps[s]["cost/tokens_processed"] for s in evaluated]
    assert all(a < b for a, b in zip(tokens, tokens[1:])), tokens
    compute = summary["compute"]["flops"]
    assert compute["total"] == sum(compute[part] for part in PARTS) == steps[3]["cost/flops"]
    assert compute["sampling"] == compute["student_sampling"] + compute["teacher_sampling"]
    assert {part for part in PARTS if compute[part] > 0} == spent
    assert steps[3]["cost/flops_cache_fill"] == compute["cache_fill"]
    assert steps[3]["cost/flops_sampling"] == compute["sampling"]
    assert steps[3]["cost/tokens_trained"] == summary["tokens"]["trained"]
    assert summary["compute"]["formula"]


def test_a_resumed_run_continues_its_counts(cached_run):
    """The cached run stopped after its step-2 checkpoint and resumed: the same costs at every step (the cache
    is not filled again: its FLOPs were spent by the first session)."""
    tmp, straight, summary = cached_run
    cut = tmp / "cut"
    shutil.copytree(straight, cut)
    for done in (cut / "metrics.json", cut / "checkpoints" / "step-000003"):
        shutil.rmtree(done) if done.is_dir() else done.unlink()
    prefix, trajectory, cache, _ = CELLS["fixed-expert-cached"]
    resumed = train_job(tiny_config(tmp, prefix, trajectory, cache), cut)
    assert resumed["resumed_from_step"] == 2
    assert resumed["compute"] == summary["compute"]

    def costs(run_dir):
        steps = merged(history(run_dir))
        return {s: {k: v for k, v in row.items() if k.startswith("cost/flops")} for s, row in steps.items()}

    assert costs(cut) == costs(straight)
