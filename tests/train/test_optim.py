"""kltd.train.optim: AdamW in torch's fused form where it runs, over the parameters that train only, computing the
update the per-tensor form computes (to the rounding of one update a step)."""

import torch

from kltd.train.optim import adamw, fused_runs

EPS32 = 2.0**-24  # float32's unit roundoff


def test_the_fused_form_runs_on_the_cpu_over_the_trained_parameters_only():
    frozen, trained = torch.nn.Parameter(torch.ones(3), requires_grad=False), torch.nn.Parameter(torch.ones(3))
    optimizer = adamw([frozen, trained], lr=1e-3, weight_decay=0.0)
    assert optimizer.defaults["fused"] is True
    assert optimizer.param_groups[0]["params"] == [trained]
    assert not fused_runs([torch.empty(3, device="meta")]) and not fused_runs([])


def test_a_step_marks_the_weights_written():
    """kltd.fast.arranged rebuilds its copy of the student when a weight's version changes: the fused kernel
    does not bump it, so kltd's step must (else the fast path samples and scores with the old weights)."""
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = adamw([weight], lr=1e-3, weight_decay=0.0)
    for step in range(1, 3):
        weight.grad = torch.ones(4)
        before = weight._version
        optimizer.step()
        assert weight._version > before


def test_the_fast_path_sees_each_step():
    """kltd.fast.arranged's reused arrangement of the student is built anew after a step."""
    from kltd.fast.arranged import arranged
    from kltd.train.models import load_model

    model = load_model("toy/student").train()
    optimizer = adamw(model.parameters(), lr=1e-2, weight_decay=0.0)
    with torch.no_grad():
        first = arranged(model)
        assert arranged(model) is first  # reused while nothing changed
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    with torch.no_grad():
        assert arranged(model) is not first


def test_the_fused_update_is_the_per_tensor_update_to_rounding():
    """Both forms get the same gradients; each step they may round the update (at most lr (1 - b1) / sqrt(1 - b2)
    in size, ~3.2 lr) differently by a few ulps and the new weight by one ulp of the weight: the weights drift apart
    by at most that each step, added up (the moments see the same gradients; their own roundings only reach the
    weights through the same bounded update)."""
    torch.manual_seed(0)
    start = [torch.randn(64, 48), torch.randn(300)]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    theirs = [torch.nn.Parameter(p.clone()) for p in start]
    lr, steps = 1e-2, 30
    fused = adamw(ours, lr=lr, weight_decay=0.01)
    plain = torch.optim.AdamW(theirs, lr=lr, weight_decay=0.01, foreach=False)
    for step in range(steps):
        for a, b in zip(ours, theirs):
            grad = torch.randn_like(a) * 10.0 ** (step % 5 - 3)  # gradients across five orders of magnitude
            a.grad, b.grad = grad.clone(), grad.clone()
        fused.step()
        plain.step()
    largest = max(float(p.detach().abs().max()) for p in theirs)
    bound = steps * (2 * EPS32 * largest + 8 * EPS32 * 3.2 * lr)
    drift = max(float((a - b).detach().abs().max()) for a, b in zip(ours, theirs))
    assert drift <= bound
    moved = max(float((a.detach() - s).abs().max()) for a, s in zip(ours, start))
    assert moved > 100 * bound  # the steps did move the weights: the comparison is not between two unmoved copies
