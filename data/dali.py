"""The NVIDIA DALI backend: decoding and augmentation of a ``Source``'s samples.

Why DALI: on ImageNet the input cost is JPEG decoding plus random-resized-crop. DALI fuses the
two (only the crop window is decoded), runs them on the GPU ("mixed" decoder) or on native CPU
threads, and needs no Python worker processes. Batches come out as uint8 NHWC seen as NCHW
(channels_last strides, no copy); ``data.device`` normalises them on the device, and lays
them out as the run asks, as it does the torchvision backend's.

Which samples, in which order: DALI's own readers (file, webdataset) shuffle and shard in their
own ways, which cannot keep the one global order (``data.sampling``) for any world size. So the
encoded bytes come in through ``fn.external_source``, fed batch by batch in this rank's part of
that order (train) or of its validation share (every image on exactly one rank). DALI's
checkpoint still holds every operator's random state, so a resume on the same world size is
bitwise exact; the position itself is ours (``TrainOrder``), so it survives another world size.
"""
import copy
import math
from collections import deque
from pathlib import Path
from typing import Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from data.order import Source
from data.sampling import TrainOrder, val_indices
from scsa.errors import UserError

try:
    from nvidia.dali import Pipeline, fn, pipeline_def, types
    from nvidia.dali.auto_aug import rand_augment
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError:  # dali_available() reports it; building a loader then fails with a clear message
    Pipeline = None

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
    """One split's DALI pipeline as an iterable of uint8 ``(images, labels, ids)`` device batches.

    ``len()`` is this rank's batches left in the epoch. ``state_dict()`` is the position in the
    global order (``TrainOrder``) plus DALI's checkpoint (every operator's random state), so a
    restored loader continues with the exact next batch; on another world size only the position
    carries over.
    """

    def __init__(self, source: Source, root: str, *, train: bool, batch_size: int, accum_steps: int, workers: int,
                 rank: int, world_size: int, device: torch.device, seed: int, augment: Dict):
        self.source, self.root, self.train, self.batch_size = source, root, train, batch_size
        self.rank, self.world_size, self.workers = rank, world_size, max(1, workers)
        self.seed, self.augment = seed, augment
        self.order = TrainOrder(source, seed=seed, rank=rank, world_size=world_size, batch_size=batch_size,
                                accum_steps=accum_steps) if train else None
        self.shard = None if train else val_indices(len(source), rank, world_size)
        self.gpu = device.type == "cuda"
        self.device_id = (device.index if device.index is not None else torch.cuda.current_device()) if self.gpu else None
        self._iter = self._iterator()

    # ---- feeding DALI: runs ahead of what the trainer consumed ---------------------------
    def _batches(self) -> Deque[np.ndarray]:
        """The feeder's batches (sample indices) of its current epoch."""
        if self.train:
            return deque(self._feeder.plan())
        return deque(self.shard[i:i + self.batch_size] for i in range(0, len(self.shard), self.batch_size))

    def _restart_feeder(self) -> None:
        self._feeder = copy.copy(self.order)  # the consumer's position; then it runs ahead on its own
        self._queue, self._ended = self._batches(), False
        self._pending: Deque[np.ndarray] = deque()  # fed to DALI, not yet handed to the trainer

    def _feed(self, info) -> Tuple[List[np.ndarray], np.ndarray, np.ndarray]:
        """DALI's next input batch: encoded images, labels and ids. Ends each epoch once
        (StopIteration), then goes on with the next one, which DALI prefetches."""
        if not self._queue:
            if not self._ended:
                self._ended = True
                raise StopIteration
            if self.train:
                self._feeder.finished()
            self._queue, self._ended = self._batches(), False
        indices = self._queue.popleft()
        self._pending.append(indices)
        return ([np.frombuffer(self.source.read(i), dtype=np.uint8) for i in indices],
                self.source.labels[indices], self.source.ids[indices].view(np.int64))

    def _pipeline(self, checkpoint: Optional[bytes] = None) -> "Pipeline":
        # Augmentation streams differ per rank. RandAugment picks its ops per sample with DALI's
        # conditionals, which pipeline_def enables.
        @pipeline_def(enable_conditionals=self.train and self.augment["randaugment_n"] > 0)
        def graph():
            jpegs, labels, ids = fn.external_source(source=self._feed, num_outputs=3, batch=True, batch_info=True,
                                                    dtype=[types.UINT8, types.INT64, types.INT64])
            images = _augment(jpegs, train=self.train, gpu=self.gpu, **self.augment)
            return images, labels.gpu() if self.gpu else labels, ids

        return graph(batch_size=self.batch_size, num_threads=self.workers, seed=self.seed + self.rank,
                     device_id=self.device_id, prefetch_queue_depth=PREFETCH, enable_checkpointing=True,
                     checkpoint=checkpoint)

    def _iterator(self, checkpoint: Optional[bytes] = None) -> "DALIGenericIterator":
        # No batch is prepared up front, so decode errors surface inside __iter__, where they are explained.
        self._restart_feeder()
        return DALIGenericIterator(self._pipeline(checkpoint), ["images", "labels", "ids"],
                                   last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True,
                                   prepare_first_batch=False)

    def _rebuild(self, checkpoint: Optional[bytes]) -> None:
        del self._iter  # frees the old pipeline (and its GPU buffers) before building the new one
        self._iter = self._iterator(checkpoint)

    # ---- the Loader contract -------------------------------------------------------------
    def __len__(self) -> int:
        """This rank's batches left in the epoch (val: all of its share)."""
        return len(self.order) if self.train else math.ceil(len(self.shard) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch. DALI already runs ahead into the epoch after the
        one just finished; anywhere else the pipeline is rebuilt (random states kept)."""
        position = (self.order.epoch, self.order.start, self.order.batches)
        if position == (epoch, 0, 0) and (self._feeder.epoch, self._feeder.start) == (epoch, 0):
            return
        self.order.set_epoch(epoch)
        self._rebuild(self._iter.checkpoints()[0])

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        while True:
            try:
                out = next(self._iter)[0]
            except StopIteration:
                if self.train:
                    self.order.finished()
                return
            except RuntimeError as e:
                raise self._explain(e) from None
            self._pending.popleft()
            if self.train:
                self.order.consumed()
            images = out["images"].permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: no copy
            yield images, out["labels"].view(-1).long(), out["ids"].view(-1)

    def state_dict(self) -> Dict:
        """The position in the global order and DALI's checkpoint of this rank (weights_only-safe)."""
        return {**self.order.state_dict(), "dali": self._iter.checkpoints()[0]}

    def load_state_dict(self, state: Dict) -> None:
        """Continue from ``state``: the next batch is the one after the save (its random states too,
        when the world size is the same)."""
        self.order.load_state_dict(state)
        same_ranks = (state["world_size"], state["batch_size"]) == (self.world_size, self.batch_size)
        self._rebuild(state["dali"] if same_ranks else None)

    # ---- naming the file behind a decode failure ------------------------------------------
    def _explain(self, error: RuntimeError) -> Exception:
        """A CorruptImageError naming the sample behind ``error`` (one of those fed to DALI and not
        yet consumed), or ``error`` if all of them decode."""
        from data.scan import UNREADABLE, check_image

        for index in (i for batch in self._pending for i in batch):
            status, reason = check_image(self.source.name(index), self.source.read(index))
            if status == UNREADABLE:
                name = self.source.name(index)
                listing = Path(self.root) / "bad_files.txt"
                return CorruptImageError(f"cannot read {Path(self.root) / name} ({reason}): add '{name}' to "
                                         f"{listing} (python -m data.scan {self.root} lists every bad file) and "
                                         f"run the same command again: it continues where it stopped")
        return error


def build_dali_loader(source: Source, root: str, *, train: bool, batch_size: int, accum_steps: int,
                      image_size: int, val_resize: int, scale: Sequence[float], ratio: Sequence[float], hflip: float,
                      randaugment_n: int, randaugment_m: int, fill: int, workers: int, rank: int, world_size: int,
                      seed: int, device: torch.device) -> DaliLoader:
    """This rank's uint8 loader for one split of ``source`` (read from ``root``); a CUDA device
    decodes on the GPU, a CPU device runs a CPU-only pipeline (``device_id=None``)."""
    if not dali_available():
        raise UserError("NVIDIA DALI is not installed: pip install -r requirements.txt, or use data.loader=torch")
    augment = dict(image_size=image_size, val_resize=val_resize, scale=scale, ratio=ratio, hflip=hflip,
                   randaugment_n=randaugment_n, randaugment_m=randaugment_m, fill=fill)
    return DaliLoader(source, root, train=train, batch_size=batch_size, accum_steps=accum_steps, workers=workers,
                      rank=rank, world_size=world_size, device=device, seed=seed, augment=augment)
