import os

# Tests never talk to W&B; the offline-logging test opts back in explicitly.
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
