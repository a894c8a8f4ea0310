"""Convert an ImageFolder root into tar shards: ``python -m data.make_shards SRC DST``.

The output is the webdataset layout (``<key>.cls`` + ``<key>.jpg`` per sample, written with
webdataset's ``TarWriter``) plus what makes start-up cheap and resume safe:

- ``<split>/shard-NNNNNN.tar`` and its DALI index ``shard-NNNNNN.idx`` (``wds2idx``'s v1.2 format);
- ``<split>.npy``: the split's sample table (id, label, shard, offset, size of each image's
  bytes), which ``data.shards.ShardSource`` memory-maps instead of walking anything;
- ``manifest.json`` (written last): classes, each shard's count, size and sha256, the source,
  the options and the bad files left out.

Training samples are written in one seeded global shuffle, validation in folder order. A key is
the image's path relative to SRC without its extension (``train/<class>/<stem>``), so a sample
keeps the folder's identity (``data.order.sample_id``). Files listed in ``SRC/bad_files.txt``
(``python -m data.scan``) are left out and counted.

Each shard is written under a temporary name, synced and renamed; its record (the rows it holds)
is written after it, the same way. A conversion that is killed or runs out of disk is run again
with the same command and continues with the shards that have no record.
"""
import argparse
import errno
import hashlib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from webdataset import TarWriter

from data.folder import check_dataset_root, list_images, read_bad_files
from data.order import sample_id
from data.shards import FORMAT, MANIFEST, ROW, TAR_BLOCK
from scsa.errors import UserError, exit_on_user_error

PROGRESS = ".progress"            # plan and per-shard records while a conversion runs
SPLITS = ("train", "val")
JPEG_QUALITY = 90                 # --max-side re-encoding (FFCV's default quality)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """Bytes of ``256MB``, ``1.5GiB``, ``300000`` and the like."""
    match = _SIZE.match(text)
    if not match:
        raise UserError(f"--shard-size '{text}' is not a size: write e.g. 256MB or 1GB")
    unit = (match.group(2) or "").lower()
    factor = _UNITS[unit[:1]] if "i" not in unit else 1024 ** "bkmgt".index(unit[0])
    return max(1, int(float(match.group(1)) * factor))


def shard_path(split: str, index: int) -> str:
    return f"{split}/shard-{index:06d}.tar"


def key_of(name: str) -> str:
    """The webdataset key of image ``name`` (``train/c/x.y.JPEG`` -> ``train/c/x_y``): the name without its
    extension, other dots replaced, since a key ends at its first dot."""
    stem = name[:name.rfind(".")] if "." in Path(name).name else name
    head, _, tail = stem.rpartition("/")
    return f"{head}/{tail.replace('.', '_')}" if head else tail.replace(".", "_")


# ---- planning ---------------------------------------------------------------------------------
@dataclass
class Job:
    split: str
    shard: int
    names: List[str]
    labels: List[int]


def plan(src: str, classes: List[str], shard_size: int, seed: int) -> Tuple[List[Job], Dict[str, int], str]:
    """The shards to write (train shuffled with ``seed``), the bad files left out per split, and a
    fingerprint of the plan (every name, size and label), which a resumed run must match."""
    jobs, skipped, digest = [], {}, hashlib.sha256()
    bad = read_bad_files(src)
    for split in SPLITS:
        names, labels = list_images(src, split, classes)
        keys: Dict[str, str] = {}
        for name in names:
            other = keys.setdefault(key_of(name), name)
            if other != name:
                raise UserError(f"'{other}' and '{name}' would share the shard key '{key_of(name)}': rename one")
        skipped[split] = sum(1 for b in bad if b.startswith(f"{split}/") and os.path.isfile(os.path.join(src, b)))
        sizes = [os.stat(os.path.join(src, n)).st_size for n in names]
        order = np.random.default_rng(seed).permutation(len(names)) if split == "train" else np.arange(len(names))
        start, total = 0, 0
        cuts = []
        for i, item in enumerate(order):
            if i > start and total + sizes[item] > shard_size:
                cuts.append((start, i))
                start, total = i, 0
            total += sizes[item]
        cuts.append((start, len(order)))
        for shard, (a, b) in enumerate(cuts):
            picked = order[a:b]
            jobs.append(Job(split, shard, [names[i] for i in picked], [labels[i] for i in picked]))
        for i in order:
            digest.update(f"{names[i]}\0{sizes[i]}\0{labels[i]}\n".encode())
    return jobs, skipped, digest.hexdigest()


# ---- writing one shard ------------------------------------------------------------------------
class HashingFile(io.RawIOBase):
    """A file being written that keeps the sha256 and the size of what went in."""

    def __init__(self, path: Path):
        self.file, self.sha256, self.size = open(path, "wb"), hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        written = self.file.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return written

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        super().close()


def _padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def encode(path: str, max_side: Optional[int]) -> bytes:
    """The stored bytes of an image: the file as is, or, past ``max_side`` px on its long side, a JPEG
    re-encoded to that size."""
    data = Path(path).read_bytes()
    if max_side is None:
        return data
    with Image.open(io.BytesIO(data)) as image:
        if max(image.size) <= max_side:
            return data
        image = image.convert("RGB")
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=JPEG_QUALITY)
        return out.getvalue()


def write_shard(job: Job, src: str, dst: str, max_side: Optional[int]) -> Dict:
    """Write ``job``'s shard, its DALI index and then its record; returns the record.

    Everything goes to temporary names first; a shard without its record is not done. A full
    disk removes the temporary file and raises a UserError.
    """
    out = Path(dst)
    tar, idx = out / shard_path(job.split, job.shard), (out / shard_path(job.split, job.shard)).with_suffix(".idx")
    record_path = out / PROGRESS / f"{job.split}-{job.shard:06d}.json"
    tmp = tar.with_name(tar.name + ".tmp")
    rows, index_lines = [], []
    try:
        stream = HashingFile(tmp)
        with TarWriter(stream, encoder=False, mtime=0) as writer:  # mtime fixed: the same input, the same bytes
            for name, label in zip(job.names, job.labels):
                key, data, cls = key_of(name), encode(os.path.join(src, name), max_side), str(label).encode()
                start = writer.tarstream.offset
                writer.write({"__key__": key, "cls": cls, "jpg": data})  # members in key order: .cls, .jpg
                cls_at, jpg_at = start + TAR_BLOCK, start + 2 * TAR_BLOCK + _padded(len(cls))
                if writer.tarstream.offset != jpg_at + _padded(len(data)):
                    raise UserError(f"'{name}': its tar member needs more than a plain header (a path over 255 "
                                    "characters?): rename it")
                rows.append((sample_id(name), label, job.shard, jpg_at, len(data)))
                index_lines.append(f"cls {cls_at} {len(cls)} {key}.cls jpg {jpg_at} {len(data)} {key}.jpg")
        stream.close()
        tmp_idx = idx.with_name(idx.name + ".tmp")
        tmp_idx.write_text(f"v1.2 {len(rows)}\n" + "\n".join(index_lines) + "\n")
        os.replace(tmp_idx, idx)
        os.replace(tmp, tar)
        record = {"path": shard_path(job.split, job.shard), "count": len(rows), "bytes": stream.size,
                  "sha256": stream.sha256.hexdigest(), "rows": [list(map(int, r)) for r in rows]}
        tmp_record = record_path.with_name(record_path.name + ".tmp")
        tmp_record.write_text(json.dumps(record))
        os.replace(tmp_record, record_path)
        return record
    except OSError as e:
        for leftover in out.joinpath(job.split).glob(f"shard-{job.shard:06d}.*.tmp"):
            leftover.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on the device writing '{tar}': free space (or pick another DST) "
                            "and run the same command again to continue") from None
        raise


def _write(args) -> Dict:
    return write_shard(*args)


# ---- the conversion ---------------------------------------------------------------------------
def _check_destination(dst: Path, identity: Dict) -> Optional[str]:
    """None for an empty or new DST, 'resume' for a previous run of this conversion, 'done' for a finished
    one; any other non-empty folder is an error."""
    if dst.exists() and not dst.is_dir():
        raise UserError(f"'{dst}' is a file: give a new or empty folder to convert into")
    if not dst.exists() or not any(dst.iterdir()):
        return None
    for path, state in ((dst / MANIFEST, "done"), (dst / PROGRESS / "plan.json", "resume")):
        if path.is_file():
            try:
                previous = json.loads(path.read_text())
            except ValueError:
                previous = {}
            if {k: previous.get(k) for k in identity} == identity:
                return state
            raise UserError(f"'{dst}' holds a conversion of other images or options: convert into an empty folder "
                            f"(or delete '{dst}')")
    raise UserError(f"'{dst}' is not empty and holds no conversion: convert into an empty or new folder")


def _records(dst: Path) -> Dict[Tuple[str, int], Dict]:
    """The finished shards' records (a shard whose file is missing or of another size is not finished)."""
    done = {}
    for path in (dst / PROGRESS).glob("*-*.json"):
        split, _, number = path.stem.rpartition("-")
        record = json.loads(path.read_text())
        tar = dst / record["path"]
        if tar.is_file() and tar.stat().st_size == record["bytes"]:
            done[(split, int(number))] = record
    return done


def _finish(dst: Path, jobs: List[Job], records: Dict[Tuple[str, int], Dict], classes: List[str],
            identity: Dict, skipped: Dict[str, int]) -> Dict:
    """Write the sample tables, then the manifest; drop the progress records."""
    splits = {}
    for split in SPLITS:
        mine = [records[(j.split, j.shard)] for j in jobs if j.split == split]
        table = np.array([tuple(row) for r in mine for row in r["rows"]], dtype=ROW)
        tmp = dst / f".{split}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, table)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst / f"{split}.npy")
        splits[split] = {"samples": len(table), "skipped_bad_files": skipped[split], "table": f"{split}.npy",
                         "shards": [{k: r[k] for k in ("path", "count", "bytes", "sha256")} for r in mine]}
    manifest = {**identity, "classes": classes, "splits": splits,
                "skipped_bad_files": sum(skipped.values())}
    tmp = dst / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, dst / MANIFEST)
    for path in (dst / PROGRESS).iterdir():
        path.unlink()
    (dst / PROGRESS).rmdir()
    return manifest


def convert(src: str, dst: str, *, max_side: Optional[int] = None, shard_size: int = 256 * 10**6,
            workers: int = 1, seed: int = 0, log=print) -> Dict:
    """Convert ``src`` into shards under ``dst`` (or continue a killed run of the same conversion);
    returns the manifest."""
    classes = check_dataset_root(src, SPLITS)
    jobs, skipped, fingerprint = plan(src, classes, shard_size, seed)
    identity = {"format": FORMAT, "source": str(Path(src).resolve()), "plan": fingerprint,
                "options": {"max_side": max_side, "shard_size": shard_size, "seed": seed, "jpeg_quality": JPEG_QUALITY}}
    out = Path(dst)
    state = _check_destination(out, identity)
    if state == "done":
        log(f"{dst} already holds this conversion: nothing to do")
        return json.loads((out / MANIFEST).read_text())
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
        for leftover in (out / split).glob("*.tmp"):  # a killed run's unfinished shard
            leftover.unlink()
    (out / PROGRESS).mkdir(exist_ok=True)
    if state is None:
        (out / PROGRESS / "plan.json").write_text(json.dumps(identity))
    records = _records(out)
    todo = [j for j in jobs if (j.split, j.shard) not in records]
    total = sum(len(j.names) for j in jobs)
    done = total - sum(len(j.names) for j in todo)
    log(f"{len(jobs)} shards, {total} images ({sum(skipped.values())} bad files left out); "
        f"{len(jobs) - len(todo)} shards already written")
    began = time.perf_counter()
    for record in _run(todo, src, dst, max_side, workers):
        records[(record["path"].split("/")[0], int(record["path"][-10:-4]))] = record
        done += record["count"]
        elapsed = time.perf_counter() - began
        log(f"{record['path']}: {record['count']} images; {done}/{total} done, {elapsed:.0f} s")
    return _finish(out, jobs, records, classes, identity, skipped)


def _run(jobs: Sequence[Job], src: str, dst: str, max_side: Optional[int], workers: int) -> Iterator[Dict]:
    args = [(job, src, dst, max_side) for job in jobs]
    if workers <= 1:
        yield from map(_write, args)
        return
    with Pool(workers) as pool:
        yield from pool.imap_unordered(_write, args)


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.make_shards", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="ImageFolder root (holds train/ and val/)")
    parser.add_argument("dst", help="output folder (new or empty, or a killed run of the same conversion)")
    parser.add_argument("--max-side", type=int, default=None,
                        help="re-encode images larger than N px on their long side to N px (default: keep bytes)")
    parser.add_argument("--shard-size", default="256MB", help="source bytes per shard (default 256MB)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="shards written in parallel")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training samples' shuffle")
    args = parser.parse_args(argv)
    if args.max_side is not None and args.max_side < 1:
        raise UserError(f"--max-side {args.max_side}: give a positive number of pixels")
    manifest = convert(args.src, args.dst, max_side=args.max_side, shard_size=parse_size(args.shard_size),
                       workers=args.workers, seed=args.seed, log=lambda m: print(m, flush=True))
    counts = ", ".join(f"{s} {v['samples']} images in {len(v['shards'])} shards" for s, v in manifest["splits"].items())
    print(f"{args.dst}: {counts}; {manifest['skipped_bad_files']} bad files left out")


if __name__ == "__main__":
    main(sys.argv[1:])
