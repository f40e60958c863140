"""Read an offline W&B run back from its ``run-<id>.wandb`` transaction log.

wandb 0.31 writes no ``wandb-summary.json`` offline and ships no reader, so tests parse the log:
a 7-byte header, then 32 KiB blocks of chunks (crc32, length, type) carrying protobuf Records.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield _parse(chunk)
        elif kind == FIRST:
            buf = chunk
        elif kind == MIDDLE:
            buf += chunk
        elif kind == LAST:
            yield _parse(buf + chunk)


def _parse(raw: bytes) -> pb.Record:
    rec = pb.Record()
    rec.ParseFromString(raw)
    return rec


def history(path: Path) -> list[dict]:
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def config(path: Path) -> dict:
    out = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "config":
            out.update({i.key: json.loads(i.value_json) for i in rec.config.update})
    return out
