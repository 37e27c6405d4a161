"""Read what an offline W&B run recorded, for tests: its `run-<id>.wandb` file.

W&B writes records in LevelDB's log format: a 7-byte file header (":W&B", magic 0xBEE1, version
0), then 32 KiB blocks of chunks, each `crc32 (4) | length (2, little-endian) | type (1)` followed
by the bytes; a record is one FULL chunk or FIRST, MIDDLE..., LAST. Each record is a protobuf
`Record` from `wandb.proto.wandb_internal_pb2`.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    path: Path
    run_id: str = ""
    group: str = ""
    job_type: str = ""
    project: str = ""
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def _records(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:
            continue  # zero padding at the end of a block
        else:
            raise ValueError(f"unknown chunk type {kind}")


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: Path) -> OfflineRun:
    """`run_dir` is one `wandb/offline-run-<time>-<id>` folder."""
    (log,) = Path(run_dir).glob("run-*.wandb")
    out = OfflineRun(Path(run_dir))
    for raw in _records(log.read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.run_id, out.group = record.run.run_id, record.run.run_group
            out.job_type, out.project = record.run.job_type, record.run.project
            for item in record.run.config.update:
                out.config[_item_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            out.history.append({_item_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                out.summary[_item_key(item)] = json.loads(item.value_json)
        elif kind == "artifact":
            out.artifacts.append(record.artifact.name)
        elif kind == "files":
            out.files += [f.path for f in record.files.files]
    return out


def offline_runs(run_dir: Path, within: float = 30.0) -> list[OfflineRun]:
    """Every offline W&B run under a pipeline run directory, oldest first.

    wandb's service process may still be writing a run's log when `run.finish()` has returned
    (seen under load in CI: the last run's file without its `run` record yet); the logs are
    read again until each reads whole with its run record, for up to `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            runs = [read_offline_run(p)
                    for p in sorted((Path(run_dir) / "wandb").glob("offline-run-*"))]
        except Exception:  # a record cut short while being written
            if time.monotonic() > deadline:
                raise
        else:
            if all(r.run_id for r in runs) or time.monotonic() > deadline:
                return runs
        time.sleep(0.2)
