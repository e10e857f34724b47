"""Read an offline W&B run file (`run-*.wandb`) back with W&B's own record schema.

The file is a LevelDB-style log (a 7-byte `:W&B` header, then 32 KiB blocks of checksummed chunks) of
`wandb_internal_pb2.Record` messages; wandb ships no Python reader for it any more, so tests parse it here and decode
each record with wandb's protobuf classes, instead of grepping bytes or trusting `wandb.run.summary` (which depends
on when, and whether, the run was finished).
"""

import json
import struct
from pathlib import Path


_HEADER_BYTES = 7
_BLOCK_BYTES = 32 * 1024
_CHUNK_HEADER = struct.Struct("<IHB")  # checksum, length, kind (1 full, 2 first, 3 middle, 4 last)


def read_records(path: str | Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path} is not a W&B run file")
    position, pending = _HEADER_BYTES, b""
    while position + _CHUNK_HEADER.size <= len(data):
        left_in_block = _BLOCK_BYTES - position % _BLOCK_BYTES
        if left_in_block < _CHUNK_HEADER.size:  # block trailer padding
            position += left_in_block
            continue
        _, length, kind = _CHUNK_HEADER.unpack_from(data, position)
        position += _CHUNK_HEADER.size
        if kind == 0 and length == 0:
            position += left_in_block - _CHUNK_HEADER.size
            continue
        pending += data[position : position + length]
        position += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_history(path: str | Path) -> list[dict]:
    """The logged rows, as {key: value}; nested keys (e.g. a histogram's `values`) are joined with '/'."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows
