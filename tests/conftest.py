import os

# Tests never talk to W&B; the offline-logging test opts back in explicitly.
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Every tensor in the suite is tiny: on a busy machine a second intra-op thread costs far more than
    # the work it takes on (subprocess runs pick their own count through trainer.num_threads).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
