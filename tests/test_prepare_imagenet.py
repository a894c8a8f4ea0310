"""Sorting a tiny fake ImageNet validation folder into val/<synset>/."""
from pathlib import Path

import pytest

from data.prepare_imagenet import main

# Devkit order is not sorted: ILSVRC2012_ID 1 is n02119789 (kit fox) in the real meta.mat.
DEVKIT_SYNSETS = ["n02119789 kit fox, Vulpes macrotis", "n01440764 tench, Tinca tinca", "n01443537 goldfish"]
TRUTH = {1: "n01440764", 2: "n02119789", 3: "n01443537", 4: "n01440764", 5: "n02119789"}


def image_id(i: int) -> str:
    return f"ILSVRC2012_val_{i:08d}"


@pytest.fixture
def val_dir(tmp_path) -> Path:
    folder = tmp_path / "val"
    folder.mkdir()
    for i in TRUTH:
        (folder / f"{image_id(i)}.JPEG").write_bytes(b"jpeg bytes %d" % i)
    return folder


@pytest.fixture
def kaggle_csv(tmp_path) -> Path:
    lines = ["ImageId,PredictionString"] + [f"{image_id(i)},{s} 1 2 30 40 {s} 5 6 70 80" for i, s in TRUTH.items()]
    path = tmp_path / "LOC_val_solution.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def devkit(tmp_path) -> tuple:
    ids = {s.split()[0]: n for n, s in enumerate(DEVKIT_SYNSETS, start=1)}
    truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("".join(f"{ids[TRUTH[i]]}\n" for i in sorted(TRUTH)))
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("\n".join(DEVKIT_SYNSETS) + "\n")
    return truth, synsets


def sorted_layout(val_dir: Path) -> dict:
    return {str(p.relative_to(val_dir)): p.read_bytes() for p in val_dir.rglob("*") if p.is_file()}


def expected_layout() -> dict:
    return {f"{s}/{image_id(i)}.JPEG": b"jpeg bytes %d" % i for i, s in TRUTH.items()}


def test_kaggle_labels_sort_the_folder_and_a_rerun_does_nothing(val_dir, kaggle_csv, capsys):
    main(["--val-dir", str(val_dir), "--labels", str(kaggle_csv)])
    assert sorted_layout(val_dir) == expected_layout()
    assert "moved 5 images into 3 class folders" in capsys.readouterr().out
    main(["--val-dir", str(val_dir), "--labels", str(kaggle_csv)])
    assert sorted_layout(val_dir) == expected_layout()
    assert "nothing to do: all 5 images are already" in capsys.readouterr().out


def test_devkit_labels_use_the_devkit_synset_order(val_dir, devkit):
    truth, synsets = devkit
    main(["--val-dir", str(val_dir), "--labels", str(truth), "--devkit-synsets", str(synsets)])
    assert sorted_layout(val_dir) == expected_layout()


def test_dry_run_prints_moves_and_changes_nothing(val_dir, kaggle_csv, capsys):
    before = sorted_layout(val_dir)
    main(["--val-dir", str(val_dir), "--labels", str(kaggle_csv), "--dry-run"])
    assert sorted_layout(val_dir) == before
    out = capsys.readouterr().out
    assert f"would move {val_dir / image_id(1)}.JPEG -> {val_dir / 'n01440764' / image_id(1)}.JPEG" in out
    assert "would move 5 images" in out


def test_an_interrupted_run_finishes(val_dir, kaggle_csv, capsys):
    (val_dir / "n01440764").mkdir()
    (val_dir / f"{image_id(1)}.JPEG").rename(val_dir / "n01440764" / f"{image_id(1)}.JPEG")
    main(["--val-dir", str(val_dir), "--labels", str(kaggle_csv)])
    assert sorted_layout(val_dir) == expected_layout()
    assert "moved 4 images" in capsys.readouterr().out


def sorted_kaggle_mapping(tmp_path) -> Path:
    path = tmp_path / "LOC_synset_mapping.txt"
    path.write_text("".join(f"n{i:08d} class {i}\n" for i in range(1000)))
    return path


@pytest.mark.parametrize("case,message", [
    ("missing val dir", "validation folder"),
    ("missing labels", "label file"),
    ("devkit without synsets", "--devkit-synsets"),
    ("missing synsets", "synset file"),
    ("kaggle synset order", "sorted"),
    ("id out of range", "is not an ILSVRC2012_ID"),
    ("image missing", "not in"),
    ("bad csv", "not a LOC_val_solution.csv"),
])
def test_errors_are_one_line_with_exit_2(tmp_path, val_dir, kaggle_csv, devkit, capsys, case, message):
    truth, synsets = devkit
    args = {"missing val dir": ["--val-dir", str(tmp_path / "nope"), "--labels", str(kaggle_csv)],
            "missing labels": ["--val-dir", str(val_dir), "--labels", str(tmp_path / "nope.csv")],
            "devkit without synsets": ["--val-dir", str(val_dir), "--labels", str(truth)],
            "missing synsets": ["--val-dir", str(val_dir), "--labels", str(truth), "--devkit-synsets", "nope"],
            "kaggle synset order": ["--val-dir", str(val_dir), "--labels", str(truth),
                                    "--devkit-synsets", str(sorted_kaggle_mapping(tmp_path))]}
    if case == "id out of range":
        truth.write_text("1\n7\n")
        args[case] = ["--val-dir", str(val_dir), "--labels", str(truth), "--devkit-synsets", str(synsets)]
    if case == "image missing":
        (val_dir / f"{image_id(3)}.JPEG").unlink()
        args[case] = ["--val-dir", str(val_dir), "--labels", str(kaggle_csv)]
    if case == "bad csv":
        kaggle_csv.write_text("ImageId,Other\nILSVRC2012_val_00000001,x\n")
        args[case] = ["--val-dir", str(val_dir), "--labels", str(kaggle_csv)]
    before = sorted_layout(val_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(args[case])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert sorted_layout(val_dir) == before
