"""Where a run's machines come from (kltd.train.nodes): SLURM's node lists, the user's settings against SLURM's
variables, and the one-line refusals of a multi-node config."""

import pytest

from kltd.schema.config import Config, ConfigError
from kltd.train.data_parallel import free_port
from kltd.train.nodes import first_host, hostnames, placed, run_id, slurm_port

SLURM = {"SLURM_JOB_ID": "4711", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0",
         "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}


@pytest.mark.parametrize("nodelist,names", [
    ("node01", ["node01"]),
    ("node[01-03,7]", ["node01", "node02", "node03", "node7"]),
    ("a[1-2],b,c[09-10]", ["a1", "a2", "b", "c09", "c10"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("gpu[008-010].cluster", ["gpu008.cluster", "gpu009.cluster", "gpu010.cluster"]),
])
def test_slurm_node_lists_expand_in_order(nodelist, names):
    assert hostnames(nodelist) == names


def test_the_first_host_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no SLURM tools: kltd's own reading
    assert first_host("gpu[07-08],login") == "gpu07"
    with pytest.raises(ConfigError, match="rdzv_endpoint"):
        first_host("gpu[a-b]")


def test_slurm_places_a_node_that_says_nothing_itself(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    place = placed(Config(), SLURM)
    d = place.cfg.distributed
    assert (d.nnodes, d.node_rank, d.rdzv_endpoint) == (2, 1, f"gpu07:{slurm_port('4711')}") and place.notes == []
    assert run_id(place.cfg, SLURM) == "kltd-slurm-4711"
    place.cfg.check()  # a complete multi-node config


def test_the_users_settings_win_over_slurms_and_say_so():
    cfg = Config()
    cfg.distributed.node_rank, cfg.distributed.rdzv_endpoint = 0, "head:29500"
    place = placed(cfg, SLURM)
    d = place.cfg.distributed
    assert (d.nnodes, d.node_rank, d.rdzv_endpoint) == (2, 0, "head:29500")
    assert place.notes == ["distributed.node_rank=0 is used, not SLURM_NODEID=1"]
    cfg = Config()
    cfg.distributed.nnodes = 1  # one machine inside a larger allocation
    place = placed(cfg, SLURM)
    assert (place.cfg.distributed.nnodes, place.cfg.distributed.node_rank) == (1, None)
    assert place.notes == ["distributed.nnodes=1 is used, not SLURM_NNODES=2"]


def test_without_slurm_nothing_changes():
    cfg = Config()
    assert placed(cfg, {}).cfg is cfg
    assert placed(cfg, {**SLURM, "SLURM_NNODES": "1"}).cfg.distributed.nodes == 1


@pytest.mark.parametrize("env,message", [
    ({k: v for k, v in SLURM.items() if k != "SLURM_STEP_ID"}, "not an srun step"),
    ({**SLURM, "SLURM_NTASKS": "8"}, "one task per node"),
    ({**SLURM, "SLURM_NNODES": "two"}, "is not a number"),
])
def test_slurm_settings_kltd_cannot_use_are_refused(env, message):
    with pytest.raises(ConfigError, match=message):
        placed(Config(), env)


@pytest.mark.parametrize("settings,message", [
    ({"nnodes": 2, "rdzv_endpoint": "h:1"}, "needs this machine's place"),
    ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, r"node_rank=2 is outside 0\.\.1"),
    ({"nnodes": 2, "node_rank": -1, "rdzv_endpoint": "h:1"}, "is outside"),
    ({"nnodes": 2, "node_rank": 1}, "needs distributed.rdzv_endpoint=HOST:PORT"),
    ({"nnodes": 2, "node_rank": 1, "rdzv_endpoint": "h"}, "is not HOST:PORT"),
    ({"nnodes": 0}, "nnodes=0 must be >= 1"),
    ({"node_rank": 1}, "drop distributed.node_rank"),
])
def test_a_multi_node_config_that_cannot_meet_is_refused(settings, message):
    cfg = Config()
    for key, value in settings.items():
        setattr(cfg.distributed, key, value)
    with pytest.raises(ConfigError, match=message) as refusal:
        cfg.check()
    assert "\n" not in str(refusal.value)


def test_the_global_batch_divides_by_every_process_of_every_node():
    cfg = Config()
    cfg.trainer.batch_size = 6
    cfg.distributed.nnodes, cfg.distributed.node_rank, cfg.distributed.rdzv_endpoint = 2, 0, "h:1"
    cfg.distributed.nproc_per_node = 2
    with pytest.raises(ConfigError, match=r"multiple of distributed.nnodes=2 x distributed.nproc_per_node=2"):
        cfg.check()


def test_an_endpoint_whose_host_this_machine_cannot_resolve_is_refused():
    from kltd.train.nodes import endpoint_problem

    cfg = Config()
    cfg.distributed.nnodes, cfg.distributed.node_rank = 2, 1
    cfg.distributed.rdzv_endpoint = "no-such-host.invalid:29500"  # .invalid never resolves (RFC 2606)
    assert "cannot resolve the host 'no-such-host.invalid'" in endpoint_problem(cfg)
    cfg.distributed.rdzv_endpoint = "127.0.0.1:29500"
    assert endpoint_problem(cfg) is None


def _agreement(rank: int, port: int, values: list, out) -> None:
    import torch.distributed as dist

    from kltd.train.ranks import Ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out.put((rank, [Ranks(rank, 2).agree(v) for v in values[rank]]))
    finally:
        dist.destroy_process_group()


def test_processes_learn_together_whether_they_found_the_same_checkpoint():
    """Ranks.agree, which a resume on several nodes asks of the step each process found (-1: none): every process
    gets the same answer, so all of them refuse together rather than some waiting at a collective."""
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    values = [[3, 3, -1], [3, -1, -1]]
    procs = [ctx.Process(target=_agreement, args=(rank, port, values, out)) for rank in (0, 1)]
    for p in procs:
        p.start()
    answers = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert answers == {0: [True, False, True], 1: [True, False, True]}


def test_a_node_whose_peers_never_arrive_ends_in_one_line(tmp_path, monkeypatch):
    """Node 1 started alone: the launcher's wait for node 0 ends in one line naming the endpoint (after the
    rendezvous timeout, shortened here from 900 s), before any model is loaded."""
    import kltd.train.data_parallel as data_parallel
    from kltd.train.job import train_job

    monkeypatch.setattr(data_parallel, "RENDEZVOUS_TIMEOUT_S", 2)
    port = free_port()  # nobody listens on it
    cfg = Config()
    cfg.model.device, cfg.wandb.mode, cfg.distributed.backend = "cpu", "disabled", "gloo"
    cfg.distributed.nnodes, cfg.distributed.node_rank = 2, 1
    cfg.distributed.rdzv_endpoint = f"127.0.0.1:{port}"
    with pytest.raises(ConfigError, match=f"did not all meet at distributed.rdzv_endpoint=127.0.0.1:{port}") as failure:
        train_job(cfg, tmp_path / "run")
    assert "\n" not in str(failure.value)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["node-1"]  # node 1 wrote only its own corner
