"""model.teacher_device: the teacher of a one-process run on a device of its own. This machine has one device,
so the CPU is both; the run must take the path that moves states to the teacher's device and its outputs back,
and give the run it gives without the option, bit for bit (same device, same arithmetic)."""

import torch

from tests.train.test_data_parallel import config, trained


def test_a_teacher_on_its_named_device_gives_the_same_run(tmp_path):
    runs = []
    for name, device in (("shared", None), ("own", "cpu")):
        cfg = config("student", "student", nproc=1, cache=tmp_path / "cache", steps=2)
        cfg.model.teacher_device = device
        runs.append(trained(cfg, tmp_path / name))
    shared, own = runs
    assert own.losses == shared.losses and len(own.losses) == 2
    assert own.weights.keys() == shared.weights.keys()
    assert all(torch.equal(own.weights[k], shared.weights[k]) for k in own.weights)
