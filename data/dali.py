"""The NVIDIA DALI backend for ImageFolder datasets.

Why DALI: on ImageNet the input cost is JPEG decoding plus random-resized-crop. DALI fuses the
two (only the crop window is decoded), runs them on the GPU ("mixed" decoder) or on native CPU
threads, and needs no Python worker processes. Batches come out as uint8 NHWC seen as NCHW
(channels_last strides, no copy); ``data.device`` normalises them on the device, and lays
them out as the run asks, as it does the torchvision backend's.

Sharding: the file reader is split by global rank. Train shards are re-drawn every epoch from one
global shuffle shared by all ranks (``shuffle_after_epoch``; ``random_shuffle`` only shuffles
inside a buffer and, unpadded, let shards overlap from the second epoch on). Shards are padded to
equal length (``pad_last_batch``), so every rank has the same number of batches:

* train: the last partial batch is dropped (as timm and torchvision do): ``floor(floor(N / world)
  / batch)`` full batches per rank, the torchvision backend's count;
* val: the padding is stripped and a batch left with no real rows is not yielded, so ranks
  together count each image once.
"""
import math
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from scsa.errors import UserError

try:
    from nvidia.dali import Pipeline, fn, pipeline_def, types
    from nvidia.dali.auto_aug import rand_augment
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError:  # dali_available() reports it; building a loader then fails with a clear message
    Pipeline = None

READER = "Reader"
PREFETCH = 2  # batches DALI runs ahead of the consumer
# nvJPEG pre-allocation hints from NVIDIA's ImageNet examples: big enough for ImageNet's largest
# JPEGs, so the decoder never reallocates mid-training.
DEVICE_MEMORY_PADDING = 211025920
HOST_MEMORY_PADDING = 140544512
RANDAUGMENT_LEVELS = 10  # timm's magnitude scale: m=10 is each op's strongest setting


def dali_available() -> bool:
    """Whether NVIDIA DALI is importable."""
    return Pipeline is not None


class CorruptImageError(UserError):
    """An image DALI cannot decode; the message names the file and how to skip it."""


def shard_size(num_samples: int, rank: int, world_size: int) -> int:
    """Real samples in a reader shard (DALI splits at ``floor(i * N / world_size)``)."""
    return (num_samples * (rank + 1)) // world_size - (num_samples * rank) // world_size


def _read(root: str, files: Sequence[str], labels: Sequence[int], *, train: bool, rank: int,
          world_size: int, seed: int):
    shuffle = dict(shuffle_after_epoch=True, shuffle_after_epoch_seed=seed) if train else dict(stick_to_shard=True)
    return fn.readers.file(file_root=root, files=list(files), labels=list(labels), name=READER, shard_id=rank,
                           num_shards=world_size, pad_last_batch=True, **shuffle)


def _augment(jpegs, *, train: bool, gpu: bool, image_size: int, val_resize: int,
             scale: Sequence[float], ratio: Sequence[float], hflip: float, randaugment_n: int, randaugment_m: int,
             fill: int):
    """Decode + crop (+ RandAugment) + flip, to uint8 HWC; one graph for CPU and GPU (only the decoder
    device differs).

    RandAugment is DALI's, on timm's magnitude scale (``m`` of 10 steps to the strongest) and
    after the crop, as timm orders it; its op list is the paper's, close to but not exactly timm's.
    """
    decoder = dict(device="mixed", device_memory_padding=DEVICE_MEMORY_PADDING,
                   host_memory_padding=HOST_MEMORY_PADDING) if gpu else dict(device="cpu")
    resize = dict(interp_type=types.INTERP_LINEAR, antialias=True)  # torchvision's antialiased bilinear
    # rounding="truncate" puts the centre crop where CenterCrop does (DALI's default rounds up a half pixel).
    crop = dict(dtype=types.UINT8, output_layout="HWC", crop=(image_size, image_size), rounding="truncate")
    if train:
        images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, random_area=list(scale),
                                               random_aspect_ratio=list(ratio), **decoder)
        images = fn.resize(images, resize_x=image_size, resize_y=image_size, **resize)
        if randaugment_n > 0:
            images = rand_augment.rand_augment(images, n=randaugment_n, m=randaugment_m,
                                               num_magnitude_bins=RANDAUGMENT_LEVELS + 1,
                                               shape=(image_size, image_size), fill_value=fill)
        return fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(probability=hflip), **crop)
    images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
    # subpixel_scale=False scales each axis to its rounded size, as PIL does (341 px, not 341.33, for 500x375).
    images = fn.resize(images, resize_shorter=val_resize, subpixel_scale=False, **resize)
    return fn.crop_mirror_normalize(images, **crop)


class DaliLoader:
    """One split's DALI pipeline as an iterable of uint8 ``(images, labels)`` device batches.

    ``len()`` is the batches left in the epoch on this rank; ``state_dict()`` holds DALI's
    checkpoint (reader position and every RNG), so a restored loader continues with the exact
    next batch. The reader reshuffles by itself after every epoch.
    """

    def __init__(self, root: str, files: Sequence[str], labels: Sequence[int], *, train: bool, batch_size: int,
                 workers: int, rank: int, world_size: int, device: torch.device, seed: int, augment: Dict):
        if len(files) < world_size:
            raise UserError(f"{root}: {len(files)} images cannot be split over {world_size} ranks")
        self.root, self.files, self.labels = root, list(files), list(labels)
        self.train, self.batch_size, self.rank, self.world_size = train, batch_size, rank, world_size
        self.workers, self.seed, self.augment = max(1, workers), seed, augment
        self.gpu = device.type == "cuda"
        self.device_id = (device.index if device.index is not None else torch.cuda.current_device()) if self.gpu else None
        self.shard_size = shard_size(len(self.files), rank, world_size)
        self._batch = 0  # batches consumed in the current epoch
        self._iter = self._iterator()

    def _pipeline(self, checkpoint: Optional[bytes] = None, reader_only: bool = False) -> "Pipeline":
        # Augmentation streams differ per rank; the shuffle seed is shared so shards stay disjoint.
        # RandAugment picks its ops per sample with DALI's conditionals, which pipeline_def enables.
        @pipeline_def(enable_conditionals=self.train and self.augment["randaugment_n"] > 0)
        def graph():
            jpegs, labels = _read(self.root, self.files, self.labels, train=self.train, rank=self.rank,
                                  world_size=self.world_size, seed=self.seed)
            if reader_only:
                return jpegs
            images = _augment(jpegs, train=self.train, gpu=self.gpu, **self.augment)
            return images, labels.gpu() if self.gpu else labels

        return graph(batch_size=self.batch_size, num_threads=self.workers, seed=self.seed + self.rank,
                     device_id=None if reader_only else self.device_id, prefetch_queue_depth=PREFETCH,
                     enable_checkpointing=True, checkpoint=checkpoint)

    def _iterator(self, checkpoint: Optional[bytes] = None) -> "DALIGenericIterator":
        # Val keeps the padded rows (FILL) and __iter__ strips them. No batch is prepared up front,
        # so decode errors surface inside __iter__, where they are explained.
        policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.FILL
        return DALIGenericIterator(self._pipeline(checkpoint), ["images", "labels"], reader_name=READER,
                                   last_batch_policy=policy, auto_reset=True, prepare_first_batch=False)

    def __len__(self) -> int:
        """Batches left in the epoch (all of them, unless a mid-epoch state was loaded)."""
        if self.train:
            return len(self._iter) - self._batch
        return math.ceil(self.shard_size / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: the reader reshuffles after every epoch, and a resumed position comes from
        ``load_state_dict`` (DALI's checkpoint holds the epoch)."""

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        while True:
            try:
                out = next(self._iter)[0]
            except StopIteration:
                self._batch = 0
                return
            except RuntimeError as e:
                raise self._explain(e) from None
            rows = self.batch_size if self.train else self.shard_size - self._batch * self.batch_size
            self._batch += 1
            if rows <= 0:
                continue
            images = out["images"][:rows].permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: no copy
            yield images, out["labels"][:rows].view(-1).long()

    def state_dict(self) -> Dict:
        """DALI's checkpoint of this rank plus the position in the epoch (weights_only-safe)."""
        return {"checkpoint": self._iter.checkpoints()[0], "batch": self._batch,
                "num_samples": len(self.files), "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: Dict) -> None:
        """Rebuild the pipeline from ``state``; the next batch is the one after the save."""
        saved = (state["num_samples"], state["world_size"], state["batch_size"])
        if saved != (len(self.files), self.world_size, self.batch_size):
            raise UserError(f"loader state was saved for (images, world size, batch size) = {saved}, this run has "
                            f"{(len(self.files), self.world_size, self.batch_size)}: resume with the same settings")
        del self._iter  # frees the old pipeline (and its GPU buffers) before building the new one
        self._iter = self._iterator(state["checkpoint"])
        self._batch = state["batch"]

    # ---- naming the file behind a decode failure ------------------------------------------
    def _explain(self, error: RuntimeError) -> Exception:
        """A CorruptImageError naming the file behind ``error``, or ``error`` if none is found.

        DALI's message names the file on some decoder paths; otherwise the reader is replayed
        from the last consumed batch and the few files it was about to decode are checked.
        """
        message = str(error)
        path = next((f for f in self.files if f in message), None) or self._find_unreadable()
        if path is None:
            return error
        details = [line.strip() for line in message.splitlines() if line.strip() and "no longer valid" not in line]
        return CorruptImageError(f"cannot read {Path(self.root) / path} ({details[-1] if details else 'unknown'}): "
                                 f"add '{path}' to {Path(self.root) / 'bad_files.txt'} (python -m data.scan "
                                 f"{self.root} lists every bad file) and restart")

    def _find_unreadable(self) -> Optional[str]:
        """Replay the reader (CPU only) from the last consumed batch; the first file PIL can't decode."""
        from data.scan import UNREADABLE, check_image

        try:
            position = self._iter.checkpoints()[0]
            probe = self._pipeline(reader_only=True)
            probe.build()
            probe = self._pipeline(checkpoint=_transplant(probe.checkpoint(), position, READER), reader_only=True)
            probe.build()
            # The failing batch is the next one or one of those prefetched after it.
            names = [sample.source_info() for _ in range(PREFETCH + 1) for sample in probe.run()[0]]
        except Exception:  # a best-effort diagnosis: if it fails, the original DALI error is raised
            return None
        # source_info() is the name as passed in `files`, relative to root.
        return next((name for name in names if check_image(str(Path(self.root) / name))[0] == UNREADABLE), None)


def _protobuf_fields(buf: bytes) -> Iterator[Tuple[int, bytes, bytes]]:
    """(field number, payload, raw bytes) of a protobuf message made of length-delimited fields."""
    def varint(i: int) -> Tuple[int, int]:
        value = shift = 0
        while True:
            value |= (buf[i] & 0x7F) << shift
            shift += 7
            i += 1
            if buf[i - 1] < 0x80:
                return value, i
    i = 0
    while i < len(buf):
        tag, j = varint(i)
        size, j = varint(j)
        yield tag >> 3, buf[j:j + size], buf[i:j + size]
        i = j + size


def _transplant(target: bytes, source: bytes, op_name: str) -> bytes:
    """``target`` checkpoint with operator ``op_name``'s state taken from ``source``.

    A DALI checkpoint is a protobuf: field 1 repeats (field 1: operator name, field 2: state)
    for every operator; restoring requires the exact operator set, hence the splice.
    """
    def op_state(checkpoint: bytes) -> Dict[str, bytes]:
        states = {}
        for number, payload, raw in _protobuf_fields(checkpoint):
            if number == 1:
                states[next(p for n, p, _ in _protobuf_fields(payload) if n == 1).decode()] = raw
        return states
    donor = op_state(source)[op_name]
    out = bytearray()
    for number, payload, raw in _protobuf_fields(target):
        is_op = number == 1 and next(p for n, p, _ in _protobuf_fields(payload) if n == 1).decode() == op_name
        out += donor if is_op else raw
    return bytes(out)


def build_dali_loader(root: str, files: List[str], labels: List[int], *, train: bool, batch_size: int,
                      image_size: int, val_resize: int, scale: Sequence[float], ratio: Sequence[float], hflip: float,
                      randaugment_n: int, randaugment_m: int, fill: int, workers: int, rank: int, world_size: int,
                      seed: int, device: torch.device) -> DaliLoader:
    """This rank's uint8 loader for one split; a CUDA device decodes on the GPU, a CPU device runs a
    CPU-only pipeline (``device_id=None``). ``files`` are relative to ``root``."""
    if not dali_available():
        raise UserError("NVIDIA DALI is not installed: pip install -r requirements.txt, or use data.loader=torch")
    augment = dict(image_size=image_size, val_resize=val_resize, scale=scale, ratio=ratio, hflip=hflip,
                   randaugment_n=randaugment_n, randaugment_m=randaugment_m, fill=fill)
    return DaliLoader(root, files, labels, train=train, batch_size=batch_size, workers=workers, rank=rank,
                      world_size=world_size, device=device, seed=seed, augment=augment)
