"""Whether the hub can be reached is a job's own question: asked once per job, and the offline switch it throws
for a dataset load is thrown back afterwards (nothing is left switched for the next job of the process)."""

import os

from kltd import hub


def test_offline_switches_hold_only_inside_the_block(monkeypatch):
    import datasets
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    before = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    with hub.cache_only_when_offline():
        assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    assert (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == before
    assert "HF_HUB_OFFLINE" not in os.environ


def test_a_new_job_asks_again(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.forget()
    assert hub.hub_reachable() is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: refused at once, no network needed
    assert hub.hub_reachable() is False  # the job's answer stands until the next job
    hub.forget()
    asked = []
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: asked.append(a) or _Closed())
    assert hub.hub_reachable() is True and len(asked) == 1
    hub.forget()


class _Closed:
    def close(self):
        pass
