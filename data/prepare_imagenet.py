"""Sort ImageNet's flat validation folder into ``val/<synset>/`` so ImageFolder (and DALI) can read it.

    python -m data.prepare_imagenet --val-dir DIR --labels LOC_val_solution.csv
    python -m data.prepare_imagenet --val-dir DIR --labels ILSVRC2012_validation_ground_truth.txt \\
        --devkit-synsets synsets.txt

Labels come from Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first token of
the prediction string is the synset), or from the devkit's ground truth (one 1-based ILSVRC2012_ID per
line, line i for ``ILSVRC2012_val_<i>``) plus a text file of ``<synset> <words>`` lines in
ILSVRC2012_ID order. That order is the devkit's ``meta.mat`` order, not the sorted order of Kaggle's
``LOC_synset_mapping.txt`` (which is refused). With scipy, write it from meta.mat with::

    python -c "import scipy.io as s; print('\\n'.join(f'{r[1]} {r[2]}' for r in \\
        s.loadmat('meta.mat', squeeze_me=True)['synsets'] if r[0] <= 1000))" > synsets.txt

Files are moved, not copied. A second run finds everything in place and changes nothing.
"""
import argparse
import csv
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from scsa.errors import UserError, exit_on_user_error

IMAGENET_CLASSES = 1000


def _existing(path: str, what: str) -> Path:
    if not Path(path).is_file():
        raise UserError(f"{what} '{path}' does not exist")
    return Path(path)


def read_kaggle_solution(path: Path) -> Dict[str, str]:
    """``{image id: synset}`` from ``LOC_val_solution.csv``."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in rows}
    except (KeyError, IndexError, AttributeError):
        raise UserError(f"'{path}' is not a LOC_val_solution.csv: expected 'ImageId,PredictionString' rows "
                        "whose prediction string starts with a synset") from None


def read_synsets(path: Path) -> List[str]:
    """Synsets of a ``<synset> <words>`` file, line i being ILSVRC2012_ID i + 1."""
    synsets = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if len(synsets) == IMAGENET_CLASSES and synsets == sorted(synsets):
        raise UserError(f"'{path}' lists synsets in sorted (Kaggle LOC_synset_mapping.txt) order, but the devkit "
                        "ground truth counts in meta.mat's ILSVRC2012_ID order: write that order (see --help) "
                        "or use --labels LOC_val_solution.csv")
    return synsets


def read_devkit_ground_truth(path: Path, synsets_path: Path) -> Dict[str, str]:
    """``{image id: synset}`` from ``ILSVRC2012_validation_ground_truth.txt`` and the devkit's synset order."""
    synsets = read_synsets(synsets_path)
    labels = {}
    for i, line in enumerate(path.read_text().split(), start=1):
        if not line.isdigit() or not 1 <= int(line) <= len(synsets):
            raise UserError(f"'{path}' line {i}: '{line}' is not an ILSVRC2012_ID in 1..{len(synsets)} "
                            f"(from '{synsets_path}')")
        labels[f"ILSVRC2012_val_{i:08d}"] = synsets[int(line) - 1]
    return labels


def read_labels(labels_path: str, devkit_synsets: Optional[str]) -> Dict[str, str]:
    """``{image id: synset}`` from either label format (told apart by the CSV header)."""
    path = _existing(labels_path, "label file")
    with path.open() as f:
        is_csv = f.readline().startswith("ImageId")
    if is_csv:
        return read_kaggle_solution(path)
    if devkit_synsets is None:
        raise UserError(f"'{path}' is a devkit ground truth of ILSVRC2012_IDs: also pass --devkit-synsets "
                        "with the devkit's synset order")
    return read_devkit_ground_truth(path, _existing(devkit_synsets, "synset file"))


def plan_moves(val_dir: Path, labels: Dict[str, str]) -> Tuple[List[Tuple[Path, Path]], int]:
    """The (source, destination) moves still to do, and how many images are already in place."""
    flat = {p.stem: p for p in val_dir.iterdir() if p.is_file()}
    placed = {p.stem: p.parent.name for d in val_dir.iterdir() if d.is_dir() for p in d.iterdir()}
    moves, done, missing = [], 0, []
    for image_id, synset in sorted(labels.items()):
        if image_id in flat:
            moves.append((flat[image_id], val_dir / synset / flat[image_id].name))
        elif placed.get(image_id) == synset:
            done += 1
        elif image_id in placed:
            raise UserError(f"{image_id} is in {val_dir / placed[image_id]}/ but labelled {synset}: "
                            "the label file disagrees with an earlier run")
        else:
            missing.append(image_id)
    if missing:
        raise UserError(f"{len(missing)} labelled images are not in '{val_dir}' (first: {missing[0]}): "
                        "is --val-dir the ImageNet validation folder?")
    return moves, done


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.prepare_imagenet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--val-dir", required=True, help="the flat folder of ILSVRC2012_val_*.JPEG")
    parser.add_argument("--labels", required=True,
                        help="LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt")
    parser.add_argument("--devkit-synsets", help="'<synset> <words>' lines in ILSVRC2012_ID order (devkit labels)")
    parser.add_argument("--dry-run", action="store_true", help="print the moves without making them")
    args = parser.parse_args(argv)
    val_dir = Path(args.val_dir)
    if not val_dir.is_dir():
        raise UserError(f"validation folder '{val_dir}' does not exist")
    labels = read_labels(args.labels, args.devkit_synsets)
    moves, done = plan_moves(val_dir, labels)
    unlabelled = sum(1 for p in val_dir.iterdir() if p.is_file()) - len(moves)
    if unlabelled:
        print(f"warning: {unlabelled} files in {val_dir} have no label and stay where they are")
    if not moves:
        print(f"nothing to do: all {done} images are already in {val_dir}/<synset>/")
        return
    for source, destination in moves:
        if args.dry_run:
            print(f"would move {source} -> {destination}")
        else:
            destination.parent.mkdir(exist_ok=True)
            source.rename(destination)
    synsets = len({d.parent.name for _, d in moves})
    verb = "would move" if args.dry_run else "moved"
    print(f"{verb} {len(moves)} images into {synsets} class folders under {val_dir} ({done} already in place)")


if __name__ == "__main__":
    main(sys.argv[1:])
