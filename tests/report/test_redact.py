"""Secrets never reach saved configs or W&B."""

from kltd.report.redact import REDACTED, redact


def test_secret_keys_and_values_from_secret_environment_variables_are_redacted(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh123")
    monkeypatch.setenv("MY_SERVICE_SECRET", "s3cr3t-value")
    monkeypatch.setenv("PATH_KEYS", "not-a-secret-name-so-kept")
    config = {"wandb": {"project": "kltd", "api_key": "wandb-key", "entity": "hf_abcdefgh123"},
              "notes": ["uses s3cr3t-value here", "plain"], "model": {"teacher": "toy/teacher", "top_k": 8}}
    clean = redact(config)
    assert clean["wandb"] == {"project": "kltd", "api_key": REDACTED, "entity": REDACTED}
    assert clean["notes"] == [REDACTED, "plain"] and clean["model"] == config["model"]
    assert "hf_abcdefgh123" not in str(clean) and "s3cr3t" not in str(clean)
