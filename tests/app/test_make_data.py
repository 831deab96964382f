"""`kltd make-data` writes only responses that `data=file` can train on: an empty one is left out and counted."""

import json

import kltd.train.make_data as make_data_module
from kltd.schema.config import MakeDataConfig


def test_empty_responses_are_left_out_and_counted(tmp_path, monkeypatch):
    real = make_data_module.decode_responses

    def every_other_empty(tokenizer, responses):  # as if the model had ended at once on every second prompt
        return [text if i % 2 else "" for i, text in enumerate(real(tokenizer, responses))]

    monkeypatch.setattr(make_data_module, "decode_responses", every_other_empty)
    cfg = MakeDataConfig(out=str(tmp_path / "student.jsonl"), n=8, batch_size=8)
    cfg.model.device, cfg.data.n_train, cfg.data.n_eval = "cpu", 16, 4
    lines = []
    summary = make_data_module.make_data(cfg, echo=lines.append)
    rows = [json.loads(line) for line in (tmp_path / "student.jsonl").read_text().splitlines()]
    assert len(rows) == summary["rows"] == 4 and summary["empty_left_out"] == 4
    assert all(row["completion"].strip() for row in rows)
    assert lines[-1].endswith("; 4 empty responses left out")
