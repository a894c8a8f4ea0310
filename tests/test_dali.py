"""DALI loaders on CPU (device_id=None): shapes, labels, sharding, resume, bad files."""
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from torchvision import datasets, transforms  # noqa: E402

from data.dali import CorruptImageError, build_dali_loader  # noqa: E402
from data.device import DeviceLoader  # noqa: E402
from data.folder import FolderSource, check_dataset_root, list_images  # noqa: E402
from data.scan import UNREADABLE, scan, write_bad_files  # noqa: E402

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
CPU = torch.device("cpu")


def save_jpeg(path: Path, size=(40, 30), color=None, seed=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=95)
    else:
        Image.new("RGB", size, color).save(path, quality=95)


def singletons(root: Path, n: int) -> Path:
    """One image per class, so a label identifies the image."""
    for i in range(n):
        for split in ("train", "val"):
            save_jpeg(root / split / f"c{i:02d}" / "img.jpg", size=(24 + i, 20 + 2 * i), seed=i)
    return root


def loaders(root, **overrides):
    """DALI's uint8 (train, val) loaders over ``root``."""
    args = dict(batch_size=4, accum_steps=1, image_size=16, val_resize=20, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                randaugment_n=0, randaugment_m=9, fill=128, workers=1, rank=0, world_size=1, device=CPU, seed=0)
    args.update(overrides)
    classes = check_dataset_root(str(root))
    return tuple(build_dali_loader(FolderSource(str(root), split, classes), str(root), train=split == "train",
                                   **args) for split in ("train", "val"))


def with_bad_files(root: Path, bad) -> Path:
    (root / "bad_files.txt").write_text("".join(f"{path}\n" for path in bad))
    return root


@pytest.fixture
def eleven(tmp_path) -> Path:
    return singletons(tmp_path / "eleven", 11)


def test_labels_follow_imagefolder_order(tmp_path):
    for split in ("train", "val"):
        for cls in ("b", "a", "c"):
            for i in range(2):
                save_jpeg(tmp_path / split / cls / f"{i}.jpg", seed=i)
    (tmp_path / "bad_files.txt").write_text("train/b/1.jpg\n")
    reference = datasets.ImageFolder(str(tmp_path / "train"))
    classes = check_dataset_root(str(tmp_path))
    files, labels = list_images(str(tmp_path), "train", classes)
    assert classes == reference.classes
    expected = [(str(Path(p).relative_to(tmp_path)), y) for p, y in reference.samples if not p.endswith("b/1.jpg")]
    assert list(zip(files, labels)) == expected

    train, _ = loaders(tmp_path, batch_size=5)
    seen = torch.cat([y for _, y, _ in train])
    assert sorted(seen.tolist()) == sorted(labels)


@pytest.mark.parametrize("channels_last", [False, True])
def test_constant_image_normalises_to_expected_value(tmp_path, channels_last):
    color = (200, 100, 50)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            for j, size in enumerate([(40, 30), (25, 60), (64, 64)]):
                save_jpeg(tmp_path / split / cls / f"{j}.jpg", size=size, color=color)
    expected = ((torch.tensor(color) - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    for backend in loaders(tmp_path, batch_size=3):
        loader = DeviceLoader(backend, MEAN, STD, CPU, channels_last)
        batches = list(loader)
        assert len(batches) == len(loader) == 2
        images, labels = batches[0]
        assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32 and images.device == CPU
        assert labels.shape == (3,) and labels.dtype == torch.int64
        assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        seen = torch.cat([y for _, y in batches]).tolist()
        assert (sorted(seen) if backend.train else seen) == [0, 0, 0, 1, 1, 1]
        assert (images - expected).abs().max() < 3 / min(STD)  # JPEG keeps a flat colour within ~2 levels


def test_val_matches_torchvision_resize_and_centre_crop(tmp_path):
    low_res = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(low_res).resize((500, 375), Image.BICUBIC)  # photo-like smooth content
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        image.save(tmp_path / split / "a" / "x.jpg", quality=95)
    _, val = loaders(tmp_path, image_size=224, val_resize=256)
    dali_pixels = next(iter(val))[0][0].float()
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()])
    torch_pixels = reference(Image.open(tmp_path / "val" / "a" / "x.jpg").convert("RGB")).float()
    # Both decode with libjpeg-turbo and filter with antialiased bilinear; the rest is rounding.
    assert (dali_pixels - torch_pixels).abs().mean() < 0.5


def test_train_shards_are_disjoint_full_batches_reshuffled_every_epoch(eleven):
    # 11 images, 2 ranks: floor(11 / 2) = 5 per rank, batches of 2: 2 full batches each
    ranks = [loaders(eleven, batch_size=2, rank=r, world_size=2)[0] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    orders = []
    for _ in range(3):
        per_rank = [[y.tolist() for _, y, _ in loader] for loader in ranks]
        assert [[len(b) for b in batches] for batches in per_rank] == [[2, 2], [2, 2]]
        epoch = [label for batches in per_rank for batch in batches for label in batch]
        assert len(set(epoch)) == 8  # no image on two ranks, none twice
        orders.append(epoch)
    assert len({tuple(o) for o in orders}) == 3, "every epoch should be a fresh global shuffle"


def test_train_drops_the_last_partial_batch(eleven):
    train, _ = loaders(eleven, batch_size=4)
    for _ in range(2):
        assert [len(y) for _, y, _ in train] == [4, 4] and len(train) == 2


@pytest.mark.parametrize("world_size,batch_size,n_images", [(1, 4, 11), (2, 4, 11), (3, 4, 11), (3, 3, 10),
                                                            (2, 2, 9)])
def test_val_counts_every_image_once(eleven, world_size, batch_size, n_images):
    skip = [f"val/c{i:02d}/img.jpg" for i in range(n_images, 11)]
    seen = []
    for rank in range(world_size):
        _, val = loaders(with_bad_files(eleven, skip), batch_size=batch_size, rank=rank, world_size=world_size)
        for _ in range(2):  # a second pass covers the same shard again
            batches = [y.tolist() for _, y, _ in val]
            assert len(batches) == len(val) and all(batches)
        seen += [label for batch in batches for label in batch]
    assert sorted(seen) == list(range(n_images))


@pytest.mark.parametrize("consumed,randaugment_n", [(0, 0), (2, 0), pytest.param(2, 2, marks=pytest.mark.slow)])
def test_state_dict_resumes_with_the_next_batch(eleven, consumed, randaugment_n):
    train, _ = loaders(eleven, batch_size=2, randaugment_n=randaugment_n)
    list(train)  # finish epoch 0 so the resume happens in a reshuffled epoch
    it = iter(train)
    for _ in range(consumed):
        next(it)
    buffer = io.BytesIO()
    torch.save(train.state_dict(), buffer)
    expected = list(it)

    resumed, _ = loaders(eleven, batch_size=2, randaugment_n=randaugment_n)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got = list(resumed)
    assert len(got) == len(expected) == 5 - consumed
    for (x0, y0, _), (x1, y1, _) in zip(expected, got):
        assert torch.equal(y0, y1) and torch.equal(x0, x1)
    assert len(list(resumed)) == len(resumed) == 5  # and the next epoch is whole


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_corrupt_jpeg_is_scanned_and_skipped(eleven, tmp_path):
    root = singletons(tmp_path, 6)
    truncate(root / "train" / "c02" / "img.jpg")
    found = scan(str(root), workers=1)
    assert list(found[UNREADABLE]) == ["train/c02/img.jpg"]
    write_bad_files(str(root), found[UNREADABLE])
    train, val = loaders(root, batch_size=1)
    for _ in range(2):
        assert sorted(torch.cat([y for _, y, _ in train]).tolist()) == [0, 1, 3, 4, 5]
    assert sorted(torch.cat([y for _, y, _ in val]).tolist()) == list(range(6))


def test_unscanned_corrupt_jpeg_is_reported_with_its_path(tmp_path):
    root = singletons(tmp_path, 7)
    truncate(root / "train" / "c05" / "img.jpg")
    train, _ = loaders(root, batch_size=2)
    with pytest.raises(CorruptImageError, match=r"train/c05/img\.jpg.*bad_files\.txt"):
        list(train)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_loader_matches_cpu_labels(eleven):
    gpu_train, gpu_val = loaders(eleven, device=torch.device("cuda"))
    _, cpu_val = loaders(eleven)
    images, labels = next(iter(gpu_train))
    assert images.is_cuda and labels.is_cuda and labels.dtype == torch.int64
    assert [y.tolist() for _, y, _ in gpu_val] == [y.tolist() for _, y, _ in cpu_val]
