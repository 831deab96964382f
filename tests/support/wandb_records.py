"""Read the records of an offline W&B run file (run-*.wandb) with no network and no wandb service.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of
records, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
Each record is a wandb_internal_pb2.Record protobuf.
"""

import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def raw_records(path: Path):
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER]) if left >= HEADER else (0, 0, 0)
        if left < HEADER or (kind == 0 and length == 0):  # block trailer padding
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def read_run(path: Path, timeout_s: float = 30.0) -> dict:
    """{'run': {'group', 'tags', 'name', 'job_type'}, 'history': [{key: value}], 'config': {key: value},
    'summary': {key: value}}.

    wandb's writer process may still be flushing after run.finish() returns on a busy machine, so this
    waits (up to timeout_s) for the run's closing "exit" record before trusting the file.
    """
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        out, complete = _parse(path)
        if complete or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _parse(path: Path) -> tuple[dict, bool]:
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    out, complete = {"run": {}, "history": [], "config": {}, "summary": {}}, False
    for data in raw_records(path):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out["run"] = {"group": r.run_group, "tags": list(r.tags), "name": r.display_name, "job_type": r.job_type}
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            complete = True
    return out, complete
