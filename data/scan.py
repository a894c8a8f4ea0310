"""Find the images a loader would choke on, once, before training: ``python -m data.scan ROOT``.

Every image under ROOT is opened, verified and fully decoded with PIL in parallel. Unreadable or
truncated files are written to ``ROOT/bad_files.txt`` (paths relative to ROOT), which both loaders
and ``python -m data.make_shards`` skip. Readable files in an unusual encoding (CMYK, or PNG data
named .JPEG, as ImageNet has a few of) are only reported as 'needs-conversion': PIL and DALI
decode them, slower tools may not. In a shard folder (``manifest.json``) every shard's sha256 is
checked against the manifest first, and bad samples are listed as ``<shard>:<member>``.
"""
import argparse
import contextlib
import io
import os
import sys
from multiprocessing import Pool
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from PIL import Image

from data.folder import BAD_FILES_LIST, is_image
from scsa.errors import UserError, exit_on_user_error

OK, NEEDS_CONVERSION, UNREADABLE = "ok", "needs-conversion", "unreadable"
_JPEG_SUFFIXES = (".jpg", ".jpeg")


def check_image(path: str, data: Optional[bytes] = None) -> Tuple[str, str]:
    """(status, reason) of one image (its encoded ``data`` if given, else the file at ``path``):
    OK, NEEDS_CONVERSION or UNREADABLE."""
    def open_image():
        return Image.open(path if data is None else io.BytesIO(data))
    try:
        with open_image() as image:
            image.verify()  # structure and checksums; the image object is unusable afterwards
        with open_image() as image:
            image.load()  # the full decode catches truncated JPEGs that verify() lets through
            fmt, mode = image.format, image.mode
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return UNREADABLE, f"{type(e).__name__}: {e}"
    if path.lower().endswith(_JPEG_SUFFIXES) and fmt != "JPEG":
        return NEEDS_CONVERSION, f"{fmt} data in a JPEG-named file"
    if mode not in ("RGB", "L"):
        return NEEDS_CONVERSION, f"{mode} colour mode"
    return OK, ""


def _check(path: str) -> Tuple[str, str, str]:
    return (path, *check_image(path))


def find_images(root: str) -> List[str]:
    """Every image file under ``root``, sorted."""
    return sorted(str(Path(folder) / name) for folder, _, names in os.walk(root, followlinks=True)
                  for name in names if is_image(name))


def scan(root: str, workers: int = os.cpu_count() or 1) -> Dict[str, Dict[str, str]]:
    """``{status: {path relative to root: reason}}`` for every image that is not OK."""
    paths = find_images(root)
    if not paths:
        raise UserError(f"no images under '{root}': expected {root}/<split>/<class>/<image>.jpg")
    found: Dict[str, Dict[str, str]] = {NEEDS_CONVERSION: {}, UNREADABLE: {}}
    with contextlib.ExitStack() as stack:
        if workers > 1:
            checked = stack.enter_context(Pool(workers)).imap_unordered(_check, paths, chunksize=64)
        else:  # one worker: this process
            checked = map(_check, paths)
        for path, status, reason in checked:
            if status != OK:
                found[status][str(Path(path).relative_to(root))] = reason
    return found


def write_bad_files(root: str, unreadable: Dict[str, str]) -> Path:
    """Write the sorted unreadable paths to ``root/bad_files.txt`` (an empty file when none)."""
    listing = Path(root) / BAD_FILES_LIST
    listing.write_text("".join(f"{path}\n" for path in sorted(unreadable)))
    return listing


@exit_on_user_error
def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.scan", description=__doc__.splitlines()[0])
    parser.add_argument("root", help="dataset root (holds train/ and val/)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes")
    args = parser.parse_args(argv)
    if not Path(args.root).is_dir():
        raise UserError(f"'{args.root}' is not a folder: pass the dataset root that holds train/ and val/")
    from data.shards import is_shard_root, scan_shards, verify
    if is_shard_root(args.root):  # a shard folder: every shard's sha256 against its manifest, then every image
        problems = verify(args.root)
        print("\n".join(problems + [f"{len(problems)} shards differ from {args.root}/manifest.json"]))
        found = scan_shards(args.root, args.workers)
    else:
        problems, found = [], scan(args.root, args.workers)
    for status in (NEEDS_CONVERSION, UNREADABLE):
        for path, reason in sorted(found[status].items()):
            print(f"{status}: {path}: {reason}")
    listing = write_bad_files(args.root, found[UNREADABLE])
    print(f"{len(found[UNREADABLE])} unreadable (written to {listing}, skipped by the loaders), "
          f"{len(found[NEEDS_CONVERSION])} need conversion (readable, left in)")
    if problems:
        raise UserError(f"{len(problems)} shards in '{args.root}' differ from their manifest (their unreadable images "
                        f"are listed in {listing}): convert again (python -m data.make_shards SRC {args.root}) or "
                        "restore them")


if __name__ == "__main__":
    main(sys.argv[1:])
