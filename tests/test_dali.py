"""DALI loaders on CPU (device_id=None): shapes, labels, sharding, resume, bad files."""
import collections
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from torchvision import datasets, transforms  # noqa: E402

from data.dali import CorruptImageError, build_dali_loaders, list_images  # noqa: E402
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
    args = dict(batch_size=4, image_size=16, val_resize=20, mean=MEAN, std=STD, scale=(0.25, 1.0),
                ratio=(3 / 4, 4 / 3), hflip=0.5, workers=1, rank=0, world_size=1, device=CPU, seed=0)
    args.update(overrides)
    return build_dali_loaders(str(root), **args)


@pytest.fixture(scope="module")
def eleven(tmp_path_factory) -> Path:
    return singletons(tmp_path_factory.mktemp("eleven"), 11)


def test_labels_follow_imagefolder_order(tmp_path):
    for cls in ("b", "A", "a", "c10", "c9"):
        for j in range(2):
            save_jpeg(tmp_path / "train" / cls / f"{j}.jpg")
            save_jpeg(tmp_path / "val" / cls / f"{j}.jpg")
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    files, labels, classes = list_images(str(tmp_path), "train", skip_files={"train/b/1.jpg"})
    reference = datasets.ImageFolder(str(tmp_path / "train"))
    assert classes == reference.classes
    expected = [(str(Path(p).relative_to(tmp_path)), y) for p, y in reference.samples if not p.endswith("b/1.jpg")]
    assert list(zip(files, labels)) == expected

    train, _ = loaders(tmp_path, batch_size=16, skip_files=["train/b/1.jpg"])
    seen = torch.cat([y for _, y in train])
    assert sorted(seen.tolist()) == sorted(labels)


@pytest.mark.parametrize("output_dtype,channels_last", [(torch.float32, False), (torch.float16, True),
                                                         (torch.bfloat16, False)])
def test_constant_image_normalises_to_expected_value(tmp_path, output_dtype, channels_last):
    color = (200, 100, 50)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            for j, size in enumerate([(40, 30), (25, 60), (64, 64)]):
                save_jpeg(tmp_path / split / cls / f"{j}.jpg", size=size, color=color)
    expected = ((torch.tensor(color) - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    for loader in loaders(tmp_path, batch_size=4, output_dtype=output_dtype, channels_last=channels_last):
        batches = list(loader)
        assert len(batches) == len(loader) == 2
        images, labels = batches[0]
        assert images.shape == (4, 3, 16, 16) and images.dtype == output_dtype and images.device == CPU
        assert labels.shape == (4,) and labels.dtype == torch.int64
        if channels_last:
            assert images.is_contiguous(memory_format=torch.channels_last)
        seen = torch.cat([y for _, y in batches]).tolist()
        assert (sorted(seen) if loader.train else seen) == [0, 0, 0, 1, 1, 1]
        assert (images.float() - expected).abs().max() < 3 / min(STD)  # JPEG keeps a flat colour within ~2 levels


def test_val_matches_torchvision_resize_and_centre_crop(tmp_path):
    low_res = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(low_res).resize((500, 375), Image.BICUBIC)  # photo-like smooth content
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        image.save(tmp_path / split / "a" / "x.jpg", quality=95)
    _, val = loaders(tmp_path, image_size=224, val_resize=256, mean=(0, 0, 0), std=(1, 1, 1))
    dali_pixels = next(iter(val))[0][0]
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()])
    torch_pixels = reference(Image.open(tmp_path / "val" / "a" / "x.jpg").convert("RGB")).float()
    # Both decode with libjpeg-turbo and filter with antialiased bilinear; the rest is rounding.
    assert (dali_pixels - torch_pixels).abs().mean() < 0.5


def test_train_shards_cover_every_image_once_per_epoch(eleven):
    ranks = [loaders(eleven, rank=r, world_size=2)[0] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    orders = []
    for _ in range(3):
        per_rank = [[y.tolist() for _, y in loader] for loader in ranks]
        epoch = [label for batches in per_rank for batch in batches for label in batch]
        assert sorted(epoch) == list(range(11))
        orders.append(epoch)
    assert len({tuple(o) for o in orders}) == 3, "every epoch should be a fresh global shuffle"


def test_train_last_batch_is_never_empty(eleven):
    # 9 images, 2 ranks, batch 2: rank 0 holds 4 images in 3 padded batches, the last one all padding.
    skip = [f"train/c{i:02d}/img.jpg" for i in (9, 10)]
    ranks = [loaders(eleven, batch_size=2, rank=r, world_size=2, skip_files=skip)[0] for r in range(2)]
    for _ in range(2):
        per_rank = [[y.tolist() for _, y in loader] for loader in ranks]
        assert [len(b) for b in per_rank] == [len(loader) for loader in ranks] == [3, 3]
        assert all(batch for batches in per_rank for batch in batches)
        seen = collections.Counter(label for batches in per_rank for batch in batches for label in batch)
        assert set(seen) == set(range(9)) and sum(seen.values()) == 10  # one padded repeat


@pytest.mark.parametrize("world_size,batch_size,n_images", [(1, 4, 11), (2, 4, 11), (3, 4, 11), (3, 3, 10),
                                                            (2, 2, 9)])
def test_val_counts_every_image_once(eleven, world_size, batch_size, n_images):
    skip = [f"val/c{i:02d}/img.jpg" for i in range(n_images, 11)]
    seen = []
    for rank in range(world_size):
        _, val = loaders(eleven, batch_size=batch_size, rank=rank, world_size=world_size, skip_files=skip)
        for _ in range(2):  # a second pass covers the same shard again
            batches = [y.tolist() for _, y in val]
            assert len(batches) == len(val) and all(batches)
        seen += [label for batch in batches for label in batch]
    assert sorted(seen) == list(range(n_images))


@pytest.mark.parametrize("consumed,randaugment_n", [(0, 0), (2, 0), (2, 2)])
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
    assert len(got) == len(expected) == 6 - consumed
    for (x0, y0), (x1, y1) in zip(expected, got):
        assert torch.equal(y0, y1) and torch.equal(x0, x1)
    assert len(list(resumed)) == len(resumed) == 6  # and the next epoch is whole


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_corrupt_jpeg_is_scanned_and_skipped(eleven, tmp_path):
    root = singletons(tmp_path, 6)
    truncate(root / "train" / "c02" / "img.jpg")
    found = scan(str(root), workers=1)
    assert list(found[UNREADABLE]) == ["train/c02/img.jpg"]
    listing = write_bad_files(str(root), found[UNREADABLE])
    train, val = loaders(root, batch_size=2, skip_files=listing.read_text().split())
    for _ in range(2):
        assert sorted(torch.cat([y for _, y in train]).tolist()) == [0, 1, 3, 4, 5]
    assert sorted(torch.cat([y for _, y in val]).tolist()) == list(range(6))


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
    assert [y.tolist() for _, y in gpu_val] == [y.tolist() for _, y in cpu_val]
