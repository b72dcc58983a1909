"""Frozen input embeddings served straight from the checkpoint file (memory-mapped), on CPU.

The input embedding matrix is only ever *looked up*: a step reads the rows of the tokens it sees. Held in
process memory it costs its full size (a 7B's 152k x 3584 bf16 table: 1.02 GiB); mapped from the safetensors
file, only the pages of rows actually read become resident, and they stay file-backed (the kernel can drop
them and read them again; nothing is written). This is what llama.cpp does with its whole model; here it is
done for the one tensor that is read sparsely. The lm_head is read whole every forward, so mapping it would
save nothing, and a tied embedding *is* the lm_head: then nothing is mapped.

It applies only where it is exact: the checkpoint stores the tensor as safetensors in the dtype the model
computes with (e.g. bf16 on disk, bf16 embeddings for a 7B on CPU), with the same shape; anywhere else the
embedding stays an ordinary in-memory tensor. The mapping is private (copy-on-write), so even a stray write
could never reach the file.
"""

from __future__ import annotations

import json
import logging
import mmap
import struct
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def safetensors_entry(file: Path, key: str) -> tuple[torch.dtype, tuple[int, ...], int, int] | None:
    """(dtype, shape, absolute byte offset, byte length) of ``key`` in a safetensors file, from its header only."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    entry = header.get(key)
    if entry is None or entry.get("dtype") not in SAFETENSORS_DTYPES:
        return None
    begin, end = entry["data_offsets"]
    return SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + n + begin, end - begin


def checkpoint_file(model_path: str, key: str, revision: str | None = None) -> Path | None:
    """The safetensors file of a local directory or a hub id's cached snapshot (of ``revision``) that holds ``key`` (no network)."""
    from transformers.utils import cached_file

    def find(name: str) -> Path | None:
        try:
            got = cached_file(
                model_path,
                name,
                revision=revision,
                local_files_only=True,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except OSError:
            return None
        return Path(got) if got else None

    index = find("model.safetensors.index.json")
    if index is not None:
        shard = json.loads(index.read_text()).get("weight_map", {}).get(key)
        return find(shard) if shard else None
    return find("model.safetensors")


def map_input_embeddings(model, model_path: str, revision: str | None = None) -> bool:
    """Swap the model's input embedding weight for a private mapped view of the checkpoint; True if done.

    Call right after loading, before anything has read the embedding in full. Skipped (False) when the
    embedding is tied to the lm_head, not on CPU, or not stored in the checkpoint exactly as loaded.
    """
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    w = emb.weight
    if w.device.type != "cpu" or (head is not None and head.weight.data_ptr() == w.data_ptr()):
        return False
    name = next((n for n, m in model.named_modules() if m is emb), None)
    if name is None:
        return False
    key = f"{name}.weight"
    file = checkpoint_file(model_path, key, revision)
    entry = safetensors_entry(file, key) if file is not None else None
    if entry is None or entry[0] != w.dtype or entry[1] != tuple(w.shape):
        log.info(
            "input embeddings kept in memory (checkpoint tensor %s not stored as %s %s)", key, w.dtype, tuple(w.shape)
        )
        return False
    dtype, shape, offset, nbytes = entry
    start = offset - offset % mmap.ALLOCATIONGRANULARITY  # map the table's bytes only, from an aligned offset
    with open(file, "rb") as f:  # private (copy-on-write): writes never reach the file
        mapping = mmap.mmap(f.fileno(), offset + nbytes - start, access=mmap.ACCESS_COPY, offset=start)
    if hasattr(mmap, "MADV_RANDOM"):
        mapping.madvise(mmap.MADV_RANDOM)  # a lookup reads a few rows: no read-ahead around them
    view = torch.frombuffer(mapping, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset - start).view(shape)
    probe = torch.unique(
        torch.cat(
            [
                torch.tensor([0, shape[0] - 1]),
                torch.randint(0, shape[0], (8,), generator=torch.Generator().manual_seed(0)),
            ]
        )
    )
    if not torch.equal(view[probe], w.data[probe]):  # the loader changed the table (a rename, a rescale): do not swap
        log.info("input embeddings kept in memory (loaded values differ from the checkpoint's %s)", key)
        return False
    emb.weight = torch.nn.Parameter(view, requires_grad=False)
    emb.weight._iq_mapped = True
    emb._iq_mapping = mapping  # the mapping lives as long as the module
    log.info(
        "input embeddings (%.2f GiB) mapped from %s: only the rows read become resident", nbytes / 2**30, file.name
    )
    return True


def is_mapped(param: torch.Tensor) -> bool:
    """Whether ``param`` is a view of a mapped checkpoint made by ``map_input_embeddings``."""
    return bool(getattr(param, "_iq_mapped", False))


def mapping_residency(param: torch.Tensor) -> tuple[int, int] | None:
    """(resident bytes, mapped bytes) of the memory mapping that holds ``param``, from /proc/self/smaps (Linux)."""
    ptr, inside, size = param.data_ptr(), False, None
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        head = line.split()[0]
        if not head.endswith(":"):  # a mapping's address-range line
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= ptr < hi
        elif inside and head == "Size:":
            size = int(line.split()[1]) * 1024
        elif inside and head == "Rss:":
            return int(line.split()[1]) * 1024, size
    return None
