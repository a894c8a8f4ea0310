"""Tar shards: the conversion keeps every image byte for byte, resumes, refuses bad input in one line;
``ShardSource`` reads them back and names what is damaged."""
import errno
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import make_shards
from data.folder import list_images
from data.make_shards import convert, main
from data.order import sample_id
from data.scan import main as scan_main
from data.shards import ShardSource, verify
from scsa.errors import UserError

SHARD = "8kB"  # a few images per shard: many shards from a tiny dataset


@pytest.fixture
def src(subset) -> Path:
    root = subset(6, 2)  # 60 train, 20 val
    names = {split: list_images(str(root), split, sorted(p.name for p in (root / "train").iterdir()))[0]
             for split in ("train", "val")}
    (root / "bad_files.txt").write_text(f"{names['train'][3]}\n{names['val'][5]}\n")
    return root


def run(src: Path, dst: Path, **options) -> dict:
    return convert(str(src), str(dst), shard_size=make_shards.parse_size(SHARD), log=lambda m: None, **options)


def error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as ended:
        main([str(a) for a in argv])
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_shards_hold_the_folder_images_byte_for_byte_without_bad_files(src, tmp_path):
    manifest = run(src, tmp_path / "shards", seed=3)
    bad = (src / "bad_files.txt").read_text().split()
    assert manifest["skipped_bad_files"] == 2
    for split in ("train", "val"):
        source = ShardSource(str(tmp_path / "shards"), split)
        names, labels = list_images(str(src), split, source.classes)
        assert not set(names) & set(bad) and len(names) == len(source) == manifest["splits"][split]["samples"]
        by_id = {sample_id(n): (n, label) for n, label in zip(names, labels)}
        stored = [by_id[int(i)] for i in source.ids]  # every id is a folder sample's (KeyError otherwise)
        assert sorted(stored) == sorted(zip(names, labels))
        for i, (name, label) in enumerate(stored):
            assert source.read(i) == (src / name).read_bytes() and source.labels[i] == label
            assert source.name(i).endswith(f"{Path(name).with_suffix('.jpg')}")
        in_order = [n for n, _ in stored]
        assert (in_order == names) == (split == "val")  # train is shuffled, val in folder order
        assert len(manifest["splits"][split]["shards"]) > (1 if split == "train" else 0)
        assert np.array_equal(source.groups, np.sort(source.groups))  # shards hold runs of the order
    assert run(src, tmp_path / "again", seed=3)["splits"] == manifest["splits"]  # seeded: the same bytes


@pytest.mark.slow
def test_worker_processes_write_the_same_shards(src, tmp_path):
    main([str(src), str(tmp_path / "two"), "--shard-size", SHARD, "--workers", "2"])
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert two["splits"] == run(src, tmp_path / "one")["splits"]


def test_tar_members_and_dali_index(src, tmp_path):
    """The webdataset layout (``<key>.cls`` + ``<key>.jpg``) and index files identical to DALI's wds2idx."""
    wds2idx = pytest.importorskip("wds2idx")
    run(src, tmp_path / "shards")
    shard = tmp_path / "shards" / "train" / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = tar.getnames()
        first_label = int(tar.extractfile(members[0]).read())
    assert members[0].endswith(".cls") and members[1] == members[0][:-4] + ".jpg"
    assert first_label == ShardSource(str(tmp_path / "shards"), "train").labels[0]
    with wds2idx.IndexCreator(str(shard), str(tmp_path / "dali.idx"), verbose=False) as creator:
        creator.create_index()
    assert (tmp_path / "dali.idx").read_text() == shard.with_suffix(".idx").read_text()


def test_max_side_reencodes_only_larger_images(src, tmp_path):
    run(src, tmp_path / "shards", max_side=40)
    source = ShardSource(str(tmp_path / "shards"), "val")
    for i in range(len(source)):
        with Image.open(io.BytesIO(source.read(i))) as image:
            assert max(image.size) == 40 and image.format == "JPEG"


def test_a_killed_conversion_continues_where_it_stopped(src, tmp_path, monkeypatch):
    clean = run(src, tmp_path / "clean")
    calls = {"n": 0}
    encode = make_shards.encode

    def killed_midway(path, max_side):
        calls["n"] += 1
        if calls["n"] == 25:  # inside a shard, after some shards were finished
            raise KeyboardInterrupt
        return encode(path, max_side)
    monkeypatch.setattr(make_shards, "encode", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path / "shards")
    monkeypatch.undo()
    dst = tmp_path / "shards"
    assert not (dst / "manifest.json").exists() and list(dst.glob("train/*.tmp"))  # the half shard is a temp file
    finished = sorted(dst.glob("train/*.tar"))
    assert finished
    finished[0].write_bytes(finished[0].read_bytes()[:-700])  # a shard cut short after its record: redone
    resumed = run(src, dst)
    assert resumed["splits"] == clean["splits"]
    assert not list(dst.rglob("*.tmp")) and not (dst / make_shards.PROGRESS).exists()


def test_a_full_disk_leaves_no_complete_looking_shard(src, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "shards"
    written = {"bytes": 0}
    write = make_shards.HashingFile.write

    def filling(self, data):
        written["bytes"] += len(data)
        if written["bytes"] > 30_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, data)
    monkeypatch.setattr(make_shards.HashingFile, "write", filling)
    err = error_line(capsys, [src, dst, "--shard-size", SHARD, "--workers", "1"])
    assert "no space left" in err and "run the same command again" in err
    assert not list(dst.rglob("*.tmp")) and not (dst / "manifest.json").exists()
    records = {json.loads(p.read_text())["path"] for p in (dst / make_shards.PROGRESS).glob("*-*.json")}
    assert {str(p.relative_to(dst)) for p in dst.glob("*/*.tar")} == records  # every tar there is finished
    monkeypatch.undo()
    assert run(src, dst)["splits"] == run(src, tmp_path / "clean")["splits"]


def test_converting_into_a_foreign_folder_is_one_line(src, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "not empty and holds no conversion" in error_line(capsys, [src, other])
    assert "is a file" in error_line(capsys, [src, other / "notes.txt"])
    run(src, tmp_path / "shards")
    assert "other images or options" in error_line(capsys, [src, tmp_path / "shards", "--seed", "5"])


def test_damaged_shard_folders_are_one_line(src, tmp_path, capsys):
    root = tmp_path / "shards"
    run(src, root)
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    shard = root / manifest["splits"]["train"]["shards"][1]["path"]

    # the same size, a header overwritten: found when that sample is read, named with its shard
    source = ShardSource(str(root), "train")
    victim = int(np.flatnonzero(source.groups == 1)[0])
    victim_id = source.ids[victim]
    data = bytearray(shard.read_bytes())
    offset = int(np.load(root / "train.npy")["offset"][victim])
    data[offset - 512:offset] = b"\x07" * 512
    shard.write_bytes(bytes(data))
    named = f"shard '{shard}' is truncated or corrupt at sample {shard.relative_to(root)}:offset {offset}"
    with pytest.raises(UserError, match=named):
        source.read(victim)
    assert verify(str(root)) == [f"{shard}: sha256 differs from the manifest's"]
    with pytest.raises(SystemExit):
        scan_main([str(root), "--workers", "1"])
    assert "1 shards in" in capsys.readouterr().err
    assert (root / "bad_files.txt").read_text() == f"{shard.relative_to(root)}:offset {offset}\n"
    listed = ShardSource(str(root), "train")  # the listed sample left out, the rest read
    assert len(listed) == len(source) - 1 and victim_id not in listed.ids
    assert all(listed.read(i) for i in range(len(listed)))
    (root / "bad_files.txt").unlink()

    shard.write_bytes(bytes(data[:-1000]))  # truncated: found at start-up
    with pytest.raises(UserError, match=f"shard '{shard}' has {len(data) - 1000} bytes, the manifest says"):
        ShardSource(str(root), "train")

    manifest["splits"]["train"]["samples"] += 1  # a manifest that disagrees with its table
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="lists 59 samples, the manifest 60"):
        ShardSource(str(root), "train")

    del manifest["splits"]["val"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="has no val split"):
        ShardSource(str(root), "val")
