"""A LoRA student (model.lora.r > 0, kltd.train.lora) on tiny real Llamas: its refusals, what trains, the plan's
fallback to the model's own forward, the adapter's gradient against the full weight's, the merged weights."""

import pytest
import torch

from kltd.data.addition import make_splits
from kltd.rollout.plan import plan_for
from kltd.schema.config import Config, ConfigError
from kltd.train import lora
from kltd.train.models import load_pair
from kltd.train.preflight import lora_problem, preflight
from kltd.train.trainer import Trainer
from tests.support.tiny_models import make_tiny_model
from tests.support.tolerances import _gamma, assert_same_gradients, gamma, loss_bounds

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return (str(make_tiny_model(root / "teacher", width=32, layers=2, seed=1)),
            str(make_tiny_model(root / "student", layers=2, seed=2)))


def config(model_dirs=None, **changes) -> Config:
    cfg = Config()
    if model_dirs:
        cfg.model.teacher, cfg.model.student = model_dirs
    cfg.model.device = "cpu"
    cfg.sampling.max_new_tokens = 10
    cfg.cache.teacher = "off"
    for key, value in changes.items():
        *path, name = key.split("__")
        section = cfg
        for part in path:
            section = getattr(section, part)
        setattr(section, name, value)
    return cfg


def make_trainer(model_dirs, **changes) -> Trainer:
    cfg = config(model_dirs, **changes)
    torch.manual_seed(0)
    pair = load_pair(cfg.model.teacher, cfg.model.student, device="cpu", lora=cfg.model.lora,
                     gradient_checkpointing=cfg.trainer.gradient_checkpointing)
    train, _ = make_splits(0, 64, 4)
    return Trainer(cfg, pair, train)


# ------------------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("changes,message", [
    ({"model__lora__r": -1}, r"model.lora.r=-1 must be >= 0"),
    ({"model__lora__r": 4, "model__lora__alpha": 0.0}, r"model.lora.alpha=0.0 must be > 0"),
    ({"model__lora__r": 4, "model__lora__dropout": 1.0}, r"model.lora.dropout=1.0 must lie in \[0, 1\)"),
    ({"model__lora__r": 4, "model__lora__target_modules": []}, r"names no module"),
    ({"model__lora__r": 4, "model__lora__quantize_base": "8bit"}, r"model.lora.quantize_base='8bit' is not valid"),
    ({"model__lora__quantize_base": "4bit"}, r"belongs to a LoRA student; set model.lora.r"),
    ({"model__lora__save_merged": True}, r"belongs to a LoRA student; set model.lora.r"),
    ({"model__lora__r": 4, "distributed__strategy": "fsdp", "distributed__nproc_per_node": 2}, r"fsdp is not built"),
    ({"model__lora__r": 4, "model__lora__quantize_base": "4bit", "model__lora__save_merged": True},
     r"save_merged=true with model.lora.quantize_base=4bit is not built"),
    ({"model__lora__r": 4, "model__lora__quantize_base": "4bit", "sampling__backend": "vllm"},
     r"quantize_base=4bit with sampling.backend=vllm is not built"),
])
def test_bad_lora_settings_are_refused_in_one_line(changes, message):
    with pytest.raises(ConfigError, match=message) as refused:
        config(**changes).check()
    assert "\n" not in str(refused.value)


def test_a_lora_student_with_an_rl_stage_is_accepted():  # tests/app/test_lora_resume.py runs one
    cfg = config(model__lora__r=4)
    cfg.rl.algorithm = "grpo"
    cfg.check()


def test_a_4bit_base_is_refused_before_any_model_loads_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, where in (("cpu", "model.device=cpu"), ("auto", "this machine has no CUDA device")):
        cfg = config(model__lora__r=4, model__lora__quantize_base="4bit", model__device=device)
        with pytest.raises(ConfigError, match=f"quantize_base=4bit needs a CUDA GPU.*{where}"):
            preflight(cfg)  # a missing model directory would be refused later: the check comes first


def test_a_4bit_base_on_a_gpu_without_bitsandbytes_says_how_to_install_it(monkeypatch):
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else found(name, *a))
    problem = lora_problem(config(model__lora__r=4, model__lora__quantize_base="4bit", model__device="auto"))
    assert problem.startswith("model.lora.quantize_base=4bit needs bitsandbytes: pip install -e '.[qlora]'")


def test_without_peft_the_line_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(lora, "peft_missing", lambda: True)
    problem = lora_problem(config(model__lora__r=4))
    assert problem == lora.MISSING and "pip install -e '.[lora]'" in problem
    assert lora_problem(config()) is None  # r=0 needs nothing


def test_a_target_that_names_no_module_is_one_line(model_dirs):
    cfg = config(model_dirs, model__lora__r=4, model__lora__target_modules=["qkv"])
    with pytest.raises(ValueError, match=r"target_modules=\['qkv'\].*named .*q_proj") as refused:
        load_pair(cfg.model.teacher, cfg.model.student, device="cpu", lora=cfg.model.lora)
    assert "\n" not in str(refused.value)


# ------------------------------------------------------------------------------------- what trains, the plan

def test_only_the_adapter_trains_and_the_optimiser_holds_only_it(model_dirs):
    trainer = make_trainer(model_dirs, model__lora__r=4, model__lora__target_modules=["q_proj", "v_proj"])
    trained = [n for n, p in trainer.student.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert len(trained) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in trainer.student.parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if not p.requires_grad}
    trainer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.student.named_parameters() if n in frozen)


def test_the_plan_runs_a_lora_student_through_its_own_forward_and_says_why(model_dirs):
    trainer = make_trainer(model_dirs, model__lora__r=4, prefix__source="student")
    plan = trainer.plan
    student, teacher = plan.training["student"], plan.training["teacher"]
    assert (student.packed, student.decoder) == (False, "forward")
    assert (teacher.packed, teacher.decoder) == (True, "lean")
    assert not plan.evaluation.student.packed and plan.evaluation.student.decoder == "forward"
    assert plan.fused_head  # from the student's own hidden states, through the adapter
    line = plan.line()
    assert "student by its own forward and decoder: it carries a LoRA adapter (model.lora.r=4)" in line
    assert "\n" not in line
    plain = plan_for(config(model_dirs, prefix__source="student"), trainer.teacher, trainer.teacher)
    assert not plain.notes  # a plain model needs no note
    # and outside the plan: the decoder and the scorer fall back for an adapted model on their own
    from kltd.rollout.decoders import ForwardDecoder, decoder_for
    from kltd.rollout.scoring import Scorer

    assert isinstance(decoder_for(trainer.student, lean=True), ForwardDecoder)
    assert not Scorer(packed=True).packs(trainer.student) and Scorer(packed=True).packs(trainer.teacher)


@pytest.mark.parametrize("cell", [
    dict(prefix__source="fixed", trajectory__supervisor="expert"),
    dict(prefix__source="student", trajectory__supervisor="student"),
    dict(prefix__source="mixed", trajectory__supervisor="expert", loss__divergence="jsd", loss__beta=0.3,
         loss__temperature=1.5, loss__normalization="sequence"),
    dict(prefix__source="fixed", trajectory__supervisor="dataset"),
    dict(prefix__source="student", trajectory__supervisor="student", loss__kl_prefix_weight=1.0,
         loss__normalization="sequence"),
])
def test_a_fresh_adapter_gives_the_loss_and_gradients_of_the_fast_path(model_dirs, cell):
    """B starts at zero, so a fresh LoRA student computes what its base computes: through its own forward it gives
    the loss of the plain student on kltd's fast paths (packed forward, fused head where the cell has one), and the
    gradient of each adapted weight (made trainable for the comparison) equals the plain student's, to float32's
    bound for two paths."""
    plain = make_trainer(model_dirs, **cell)
    adapted = make_trainer(model_dirs, model__lora__r=4, **cell)
    assert plain.plan.training["student"].packed and not adapted.plan.training["student"].packed
    batch, _ = plain.states.build(plain.next_examples(6), torch.Generator().manual_seed(0))
    denominator = float(batch.supervised.sum())
    for p in adapted.student.parameters():
        p.requires_grad_(True)
    losses, grads = [], []
    for trainer in (plain, adapted):
        trainer.student.zero_grad(set_to_none=True)
        loss, _ = trainer.loss(batch, denominator)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n.replace(".base_layer", ""): p.grad for n, p in trainer.student.named_parameters()
                      if p.grad is not None and ".lora_" not in n})
    loss_tol, grad_tol = loss_bounds(plain.student.config.to_dict(), plain.teacher.config.to_dict(),
                                     int(batch.supervised.sum()), denominator, losses[0])
    assert abs(losses[1] - losses[0]) <= loss_tol
    assert_same_gradients(grads[1], grads[0], grad_tol)


@pytest.mark.parametrize("cell,other", [
    (dict(prefix__source="fixed", trajectory__supervisor="expert"), dict(trainer__fused_head=False)),
    (dict(prefix__source="student", trajectory__supervisor="student"), dict(trainer__fused_head=False)),
    # activations recomputed in backward: the adapter's gradients are the same
    (dict(prefix__source="fixed", trajectory__supervisor="expert"),
     dict(trainer__fused_head=False, trainer__gradient_checkpointing=True)),
])
def test_a_lora_students_fused_head_equals_its_logits_path(model_dirs, cell, other):
    fused = make_trainer(model_dirs, model__lora__r=4, **cell)
    reference = make_trainer(model_dirs, model__lora__r=4, **other, **cell)
    for trainer in (fused, reference):  # a non-zero B: the adapter changes the outputs
        with torch.no_grad():
            for name, p in trainer.student.named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.linspace(-0.2, 0.2, p.numel()).view_as(p))
    assert fused.can_fuse() and not reference.can_fuse()
    batch, _ = fused.states.build(fused.next_examples(6), torch.Generator().manual_seed(0))
    denominator = float(batch.supervised.sum())
    results = []
    for trainer in (fused, reference):
        trainer.student.zero_grad(set_to_none=True)
        loss, _ = trainer.loss(batch, denominator)
        loss.backward()
        results.append((float(loss.detach()),
                        {n: p.grad for n, p in trainer.student.named_parameters() if p.grad is not None}))
    loss_tol, grad_tol = loss_bounds(fused.student.config.to_dict(), fused.teacher.config.to_dict(),
                                     int(batch.supervised.sum()), denominator, results[1][0])
    assert abs(results[0][0] - results[1][0]) <= loss_tol
    assert_same_gradients(results[0][1], results[1][1], grad_tol)


# ------------------------------------------------------------------------------- the adapter's gradient

def _adapted_tiny_llama(dtype, target="q_proj"):
    """A tiny random Llama with a LoRA adapter on `target` (alpha / r = 4 / 2 = 2) whose B is not zero."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    model = model.to(dtype)
    settings = config(model__lora__r=2, model__lora__alpha=4.0, model__lora__target_modules=[target]).model.lora
    lora.wrap(model, settings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.3)
    return model


def _loss(model, tokens):
    logits = model(input_ids=tokens).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def test_the_adapters_gradient_is_the_full_weights_gradient_projected_through_it():
    """dL/dB = s dL/dW A^T and dL/dA = s B^T dL/dW (s = alpha / r), where dL/dW is the full weight's gradient in the
    same forward (W + s B A is the weight the model applies). Each side is a float32 sum, over tokens and the
    layer's width, of the same products s g_t[o] x_t[i] A[r, i] (or B[o, r]); their difference is within twice
    float32's bound for that many terms times the sum of the products' absolute values."""
    model = _adapted_tiny_llama(torch.float32)
    tokens = torch.randint(0, 23, (3, 9), generator=torch.Generator().manual_seed(1))
    layer = model.model.layers[1].self_attn.q_proj
    base = layer.get_base_layer()
    base.weight.requires_grad_(True)  # the full model's gradient, read off the same graph
    seen = {}
    base.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach()))
    layer.register_full_backward_hook(lambda m, grad_in, grad_out: seen.update(g=grad_out[0].detach()))
    _loss(model, tokens).backward()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    assert s == 2.0
    full = base.weight.grad
    x, g = seen["x"].reshape(-1, A.shape[1]), seen["g"].reshape(-1, B.shape[0])
    tokens_n, out_n, in_n = x.shape[0], B.shape[0], A.shape[1]
    weight_terms = g.abs().T @ x.abs()  # |dL/dW|'s terms, summed absolutely: [out, in]
    with torch.no_grad():
        want_B, want_A = s * full @ A.T, s * B.T @ full
        bound_B = 2 * gamma(tokens_n + in_n + 2) * s * (weight_terms @ A.abs().T)
        bound_A = 2 * gamma(tokens_n + out_n + 2) * s * (B.abs().T @ weight_terms)
    assert B.grad.abs().max() > 0 and A.grad.abs().max() > 0
    assert ((B.grad - want_B).abs() <= bound_B).all()
    assert ((A.grad - want_A).abs() <= bound_A).all()


def test_the_adapted_gradient_equals_the_plain_merged_models_in_float64():
    """The same identity against a separate plain model whose weight is W + s B A (merged_weights): its dL/dW gives
    the adapter's gradients too. In float64 the two models differ by rounding only."""
    from transformers import LlamaForCausalLM

    model = _adapted_tiny_llama(torch.float64, target="v_proj")
    tokens = torch.randint(0, 23, (2, 11), generator=torch.Generator().manual_seed(2))
    _loss(model, tokens).backward()
    plain = LlamaForCausalLM(model.config).to(torch.float64)
    merged = lora.merged_weights(model)
    assert not any(".lora_" in n or "base_layer" in n for n in merged)
    missing, unexpected = plain.load_state_dict(merged, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    _loss(plain, tokens).backward()
    for i in range(2):
        layer = model.model.layers[i].self_attn.v_proj
        full = plain.model.layers[i].self_attn.v_proj.weight.grad
        A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        A_grad, B_grad, A, B = A.grad, B.grad, A.detach(), B.detach()
        # each entry sums 16 (the width) products of |s| |dL/dW| |A or B|; the two forwards and backwards differ by
        # far fewer than 10^5 float64 roundings in a chain
        scale = 16 * s * float(full.abs().max()) * max(float(A.abs().max()), float(B.abs().max()))
        tol = _gamma(10**5, 2.0**-53) * scale
        assert float((B_grad - s * full @ A.T).abs().max()) <= tol
        assert float((A_grad - s * B.T @ full).abs().max()) <= tol


def test_kltd_eval_and_make_data_refuse_an_adapter_they_would_not_load():
    from kltd.schema.config import EvalRunConfig, MakeDataConfig

    evaluation = EvalRunConfig()
    evaluation.model.lora.r = 4
    with pytest.raises(ConfigError, match="kltd eval evaluates a model as it is"):
        evaluation.check()
    data = MakeDataConfig(out="x.jsonl")
    data.model.lora.r = 4
    with pytest.raises(ConfigError, match="make-data samples model.student as it is"):
        data.check()


def test_a_lora_students_label_sets_it_apart_from_the_whole_model():
    """Runs with one label are seeds of one method (kltd compare): a LoRA run is another method than full training."""
    from kltd.schema.matrix import slug

    assert config().method == "SFT"
    assert config(model__lora__r=16).method == "SFT lora(16)"
    assert slug(config(model__lora__r=16).method) == "sft-lora-16"
    assert config(model__lora__r=16, model__lora__quantize_base="4bit").method == "SFT qlora(16)"


def test_a_lora_run_without_a_merged_student_is_named_as_such(tmp_path):
    from kltd.train.models import check_model_reference

    (tmp_path / "adapter").mkdir()
    (tmp_path / "metrics.json").write_text("{}")
    problem = check_model_reference(str(tmp_path))
    assert "LoRA run without a merged student" in problem and "model.lora.save_merged=true" in problem


def test_a_4bit_base_trains_its_adapter_and_resumes_exactly(tmp_path):
    """QLoRA's path, in process on bitsandbytes' CPU kernels (the command refuses a CPU: CUDA's kernels are what
    quantize_base=4bit is for, and they are untested here). The base's layers are 4-bit ones, which the fast paths
    do not read; only the adapter trains; a checkpoint (the adapter alone) restored into a freshly loaded student
    takes the next step bit for bit as the run that went on."""
    pytest.importorskip("bitsandbytes")
    from kltd.train import checkpoint

    def quantized():
        cfg = config(model__lora__r=4, model__lora__quantize_base="4bit", prefix__source="student",
                     trajectory__supervisor="student", trainer__batch_size=4, trainer__lr=1e-2, trainer__warmup_steps=0)
        torch.manual_seed(0)
        pair = load_pair(cfg.model.teacher, cfg.model.student, device="cpu", lora=cfg.model.lora)
        return Trainer(cfg, pair, make_splits(0, 64, 4)[0])

    trainer = quantized()
    q_proj = trainer.student.model.layers[0].self_attn.q_proj.get_base_layer()
    assert type(q_proj).__name__ == "Linear4bit"
    assert "LoRA adapter (model.lora.r=4, base in 4 bits)" in trainer.plan.line()
    assert not trainer.plan.training["student"].packed
    frozen = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    trainer.step()
    saved = checkpoint.save(tmp_path, checkpoint.snapshot(trainer), checkpoint.Progress(step=1), {}, keep=1)
    assert (saved / "adapter" / "adapter_model.safetensors").is_file() and not (saved / "model.safetensors").exists()
    went_on = trainer.step()
    now = dict(trainer.student.named_parameters())
    assert all(torch.equal(now[n], frozen[n]) for n in frozen)
    assert any(not torch.equal(now[n], trained[n]) for n in trained)
    resumed = quantized()
    checkpoint.latest(tmp_path).restore(resumed)
    again = resumed.step()
    assert again.loss == went_on.loss
    assert all(torch.equal(p, now[n]) for n, p in resumed.student.named_parameters())
