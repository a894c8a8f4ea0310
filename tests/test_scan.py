"""The bad-image scanner: what it flags, what it writes, how the CLI fails."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.folder import check_dataset_root, list_images
from data.scan import NEEDS_CONVERSION, OK, UNREADABLE, check_image, find_images, main, scan


def image(mode="RGB", size=(32, 24)) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.fixture
def dataset(tmp_path) -> Path:
    good = tmp_path / "train" / "a"
    good.mkdir(parents=True)
    image().save(good / "rgb.jpg")
    image("L").save(good / "gray.JPEG")
    image("RGBA").save(good / "rgba.png")
    image("CMYK").save(good / "cmyk.jpg")
    image().save(good / "png_inside.JPEG", format="PNG")
    data = (good / "rgb.jpg").read_bytes()
    bad = tmp_path / "val" / "b"
    bad.mkdir(parents=True)
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (bad / "garbage.jpg").write_bytes(b"not an image" * 20)
    (bad / "empty.png").write_bytes(b"")
    (bad / "readme.txt").write_text("ignored: not an image extension")
    return tmp_path


@pytest.mark.parametrize("name,status", [
    ("train/a/rgb.jpg", OK), ("train/a/gray.JPEG", OK), ("train/a/cmyk.jpg", NEEDS_CONVERSION),
    ("train/a/png_inside.JPEG", NEEDS_CONVERSION), ("val/b/truncated.jpg", UNREADABLE),
    ("val/b/garbage.jpg", UNREADABLE), ("val/b/empty.png", UNREADABLE)])
def test_check_image(dataset, name, status):
    assert check_image(str(dataset / name))[0] == status


def test_scan_reports_relative_paths(dataset):
    found = scan(str(dataset), workers=1)
    assert sorted(found[UNREADABLE]) == ["val/b/empty.png", "val/b/garbage.jpg", "val/b/truncated.jpg"]
    assert sorted(found[NEEDS_CONVERSION]) == ["train/a/cmyk.jpg", "train/a/png_inside.JPEG", "train/a/rgba.png"]


def test_cli_writes_bad_files(dataset, capsys):
    main([str(dataset), "--workers", "1"])
    assert (dataset / "bad_files.txt").read_text().splitlines() == [
        "val/b/empty.png", "val/b/garbage.jpg", "val/b/truncated.jpg"]
    out = capsys.readouterr().out
    assert "unreadable: val/b/truncated.jpg" in out and "3 unreadable" in out and "3 need conversion" in out


def test_cli_fails_in_one_line_on_a_missing_or_empty_root(tmp_path, capsys):
    for root in (tmp_path / "missing", tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            main([str(root)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1


def test_scan_and_the_loaders_see_the_same_files(tmp_path):
    for split in ("train", "val"):
        folder = tmp_path / split / "a"
        folder.mkdir(parents=True)
        for suffix in ("jpg", "JPEG", "png", "ppm", "pgm", "bmp", "webp", "tif"):
            image("L" if suffix == "pgm" else "RGB").save(folder / f"x.{suffix}")
        (folder / "notes.txt").write_text("not an image")
    classes = check_dataset_root(str(tmp_path))
    listed = [f for split in ("train", "val") for f in list_images(str(tmp_path), split, classes)[0]]
    assert sorted(listed) == sorted(str(Path(p).relative_to(tmp_path)) for p in find_images(str(tmp_path)))
    assert len(listed) == 16
