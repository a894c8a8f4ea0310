"""A folder of tar shards (``python -m data.make_shards``) as a ``data.order.Source``.

Start-up reads ``manifest.json`` and memory-maps the split's sample table (``<split>.npy``: id,
label, shard, offset and size of every image's bytes); it walks nothing per image, and forked
workers share the table's pages instead of copying Python lists. The only per-shard work is one
``stat`` to check each shard's size against the manifest (a truncated or replaced shard is
caught before training; ``python -m data.scan DST`` checks every sha256).

Why positioned reads and not a streaming tar reader: the epoch order (``data.order``) is one
global order of samples for any number of ranks, fixed by (seed, epoch) and kept by identity
when a job resumes on another world size. webdataset's ``WebDataset`` and DALI's
``fn.readers.webdataset`` hand out whole shards per rank/worker and shuffle inside a buffer,
so the samples a rank sees depend on the world size and the worker count, and a position
can't be carried from 2 ranks to 1. Reading ``size`` bytes at ``offset`` (``os.pread``) gives
random access to any sample; ``data.order`` groups the order by windows of shards, so ranks
still read a few shards at a time, mostly forward.
"""
import contextlib
import hashlib
import json
import os
import tarfile
from collections import OrderedDict
from multiprocessing import Pool
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from data.folder import read_bad_files
from scsa.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "scsa-shards/1"
TAR_BLOCK = 512
# A split's sample table (``<split>.npy``), one row per image in shard order.
ROW = np.dtype([("id", "<u8"), ("label", "<i8"), ("shard", "<i8"), ("offset", "<i8"), ("size", "<i8")])
OPEN_SHARDS = 64  # file descriptors kept open per process (least recently used closed first)


class DamagedShardError(UserError, OSError):
    """A sample whose tar header or bytes are not what the table says. An OSError too, so the torchvision
    backend skips it with a warning naming it, as it does an unreadable image; DALI's feed stops with it."""


def open_shard_sources(root: str, splits: Sequence[str]) -> Dict[str, "ShardSource"]:
    """``root``'s ``splits`` as ShardSources (one manifest read for all)."""
    manifest = read_manifest(root)
    return {split: ShardSource(root, split, manifest) for split in splits}


def is_shard_root(root: str) -> bool:
    """Whether ``root`` is a shard folder (it has a ``manifest.json``)."""
    return (Path(root) / MANIFEST).is_file()


def read_manifest(root: str) -> Dict:
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"'{path}' is not valid JSON ({e}): convert again with python -m data.make_shards") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"'{path}' is not a {FORMAT} manifest: convert with python -m data.make_shards")
    return manifest


def _reconvert(root: str) -> str:
    return f"convert again (python -m data.make_shards SRC {root}) or restore the shard folder"


class ShardSource:
    """One split of a shard folder: ``ids``, ``labels``, ``groups`` (the shard of each sample) as
    views of the memory-mapped table; ``read(i)`` is one positioned read. Samples listed in the
    folder's ``bad_files.txt`` (as ``name()`` names them) are left out: then the table is a copy."""

    def __init__(self, root: str, split: str, manifest: Optional[Dict] = None, leave_out_bad: bool = True):
        self.root = Path(root)
        manifest = manifest or read_manifest(root)
        if split not in manifest["splits"] or not manifest["splits"][split]["samples"]:
            raise UserError(f"shard folder '{root}' has no {split} split: convert an ImageFolder root with "
                            f"{split}/ (python -m data.make_shards SRC {root})")
        info = manifest["splits"][split]
        self.classes: List[str] = list(manifest["classes"])
        self.shards: List[str] = [s["path"] for s in info["shards"]]
        try:
            table = np.load(self.root / info["table"], mmap_mode="r")
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read the sample table '{self.root / info['table']}' ({e}): {_reconvert(root)}") \
                from None
        if len(table) != info["samples"] or len(table) != sum(s["count"] for s in info["shards"]):
            raise UserError(f"'{self.root / info['table']}' lists {len(table)} samples, the manifest "
                            f"{info['samples']}: {_reconvert(root)}")
        for shard in info["shards"]:
            path = self.root / shard["path"]
            size = path.stat().st_size if path.is_file() else None
            if size != shard["bytes"]:
                found = "is missing" if size is None else f"has {size} bytes"
                raise UserError(f"shard '{path}' {found}, the manifest says {shard['bytes']}: {_reconvert(root)}")
        self._files: "OrderedDict[int, int]" = OrderedDict()
        self._pid = os.getpid()
        self._use(table)
        bad = self._listed_bad(read_bad_files(root)) if leave_out_bad else []
        if bad:  # a copy of the table without them (the rest keep their order: data.order)
            self._use(np.delete(np.asarray(table), bad))

    def _use(self, table: np.ndarray) -> None:
        self.ids, self.labels, self.groups = table["id"], table["label"], table["shard"]
        self._offsets, self._sizes = table["offset"], table["size"]

    def _listed_bad(self, listed: Iterable[str]) -> List[int]:
        """Rows of the samples named (as ``name()`` names them) in ``bad_files.txt``."""
        rows = []
        for entry in listed:
            shard = entry.partition(":")[0]
            if shard in self.shards:
                candidates = np.flatnonzero(self.groups == self.shards.index(shard))
                rows += [int(i) for i in candidates if self.name(int(i)) == entry]
        return rows

    def __len__(self) -> int:
        return len(self.ids)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: its own descriptors (pread is safe, but LRU closes are not)
            self._files, self._pid = OrderedDict(), os.getpid()
        fd = self._files.pop(shard, None)
        if fd is None:
            fd = os.open(self.root / self.shards[shard], os.O_RDONLY)
            if len(self._files) >= OPEN_SHARDS:
                os.close(self._files.popitem(last=False)[1])
        self._files[shard] = fd
        return fd

    def _member(self, index: int) -> "tuple[tarfile.TarInfo | None, bytes]":
        """The tar header in front of sample ``index``'s bytes (None if it doesn't parse) and the bytes."""
        shard, offset, size = int(self.groups[index]), int(self._offsets[index]), int(self._sizes[index])
        block = os.pread(self._fd(shard), TAR_BLOCK + size, offset - TAR_BLOCK)
        try:
            header = tarfile.TarInfo.frombuf(block[:TAR_BLOCK], "utf-8", "surrogateescape")
        except tarfile.TarError:
            header = None
        return header, block[TAR_BLOCK:]

    def read(self, index: int) -> bytes:
        """Sample ``index``'s stored image bytes; a truncated or corrupt shard raises a DamagedShardError naming
        the shard and the sample."""
        header, data = self._member(index)
        if header is None or header.size != len(data) or header.size != int(self._sizes[index]):
            shard = self.root / self.shards[int(self.groups[index])]
            raise DamagedShardError(f"shard '{shard}' is truncated or corrupt at sample {self.name(index)}: "
                                    f"{_reconvert(str(self.root))}")
        return data

    def name(self, index: int) -> str:
        """``<shard>:<member>``, the shard relative to the root, the member named by its tar header (or by
        its byte offset if that is unreadable)."""
        shard = self.shards[int(self.groups[index])]
        try:
            header, _ = self._member(index)
        except OSError:
            header = None
        return f"{shard}:{header.name if header is not None else f'offset {int(self._offsets[index])}'}"


def verify(root: str) -> List[str]:
    """Problems found by checking every shard's size and sha256 against the manifest (empty: all good)."""
    problems = []
    for info in read_manifest(root)["splits"].values():
        for shard in info["shards"]:
            path = Path(root) / shard["path"]
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            if digest.hexdigest() != shard["sha256"]:
                problems.append(f"{path}: sha256 differs from the manifest's")
    return problems


_SCANNED: List[ShardSource] = []  # the sources being scanned, inherited by forked scan workers


def _check_sample(item: "tuple[int, int]") -> "tuple[str, str, str]":
    from data.scan import check_image

    source = _SCANNED[item[0]]
    try:
        return (source.name(item[1]), *check_image(source.name(item[1]), source.read(item[1])))
    except DamagedShardError as e:
        return source.name(item[1]), "unreadable", str(e)


def scan_shards(root: str, workers: int) -> Dict[str, Dict[str, str]]:
    """``python -m data.scan``'s ``{status: {name: reason}}`` for every sample of a shard folder (all of
    them, those already in ``bad_files.txt`` too), named as ``bad_files.txt`` lists them."""
    from data.scan import NEEDS_CONVERSION, OK, UNREADABLE

    manifest = read_manifest(root)
    _SCANNED[:] = [ShardSource(root, split, manifest, leave_out_bad=False) for split in manifest["splits"]]
    items = [(s, i) for s, source in enumerate(_SCANNED) for i in range(len(source))]
    found: Dict[str, Dict[str, str]] = {NEEDS_CONVERSION: {}, UNREADABLE: {}}
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(Pool(workers)) if workers > 1 else None
        for name, status, reason in (pool.imap_unordered(_check_sample, items, chunksize=64) if pool
                                     else map(_check_sample, items)):
            if status != OK:
                found[status][name] = reason
    return found
