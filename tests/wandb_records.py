"""Read an offline W&B run (``run-<id>.wandb``) with wandb's own record format.

The file is a LevelDB-style log of 32 KiB blocks whose records are ``wandb_internal_pb2.Record``
protobuf messages; wandb ships the message definitions, so nothing is parsed as text.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_HEADER = 7  # ":W&B" magic, 2-byte magic number, 1-byte version


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pos, partial = [], _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos : pos + length], pos + length
        if kind == 1:  # full record
            payload = chunk
        elif kind == 2:  # first fragment
            partial = chunk
            continue
        elif kind == 3:  # middle fragment
            partial += chunk
            continue
        else:  # last fragment
            payload, partial = partial + chunk, b""
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def wait_until_complete(path: str | Path, timeout: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """Records of a run once its exit record is written (wandb's service writes asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = read_records(path)
        except Exception:  # noqa: BLE001 - a record still being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def summarize(path: str | Path) -> dict:
    """Config, logged history keys and final summary of one finished run file."""
    config: dict = {}
    history_keys: set[str] = set()
    summary: dict = {}
    records = wait_until_complete(path)
    assert any(r.WhichOneof("record_type") == "exit" for r in records), f"{path} never finished"
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            items = r.run.config.update if kind == "run" else r.config.update
            for item in items:
                key = item.key or "/".join(item.nested_key)
                value = json.loads(item.value_json)
                # config values are stored as {"value": ..., "desc": ...}
                config[key] = value["value"] if isinstance(value, dict) and "value" in value else value
        elif kind == "history":
            history_keys |= {item.key or "/".join(item.nested_key) for item in r.history.item}
        elif kind == "summary":
            for item in r.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return {"config": config, "history_keys": history_keys, "summary": summary}
