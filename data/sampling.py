"""Which samples this rank reads: its part of each epoch's global order, and the epoch's position.

Both backends take their indices from here, so they read the same samples in the same batches
(``data.order`` says why the order is one for any world size). An epoch is ``floor(N / G)``
full global batches of ``G = world_size * batch_size * accum_steps`` samples; in optimiser step
``s``, micro-batch ``m``, rank ``r`` reads ``order[s*G + (m*world_size + r)*batch_size:][:batch_size]``.
The position (``state_dict``) is the same on every rank and is kept by sample identity, so it
survives another world size and samples removed from the list (``bad_files.txt``).
"""
from typing import Dict, Optional, Tuple

import numpy as np

from data.order import Source, order_keys, position, sample_id, visiting_order
from scsa.errors import UserError

SHARD_WINDOW = 4  # shards read at a time by all ranks together (sources with groups only)


class TrainOrder:
    """This rank's training batches, epoch by epoch, from a position that every rank shares."""

    def __init__(self, source: Source, *, seed: int, rank: int, world_size: int, batch_size: int,
                 accum_steps: int):
        self.ids, self.groups, self.seed = source.ids, source.groups, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.global_batch = world_size * batch_size * accum_steps
        self.epoch = 0
        self.start = 0     # where this pass over the epoch began in the epoch's order
        self.done = 0      # global samples of the epoch consumed before ``start`` (samples_done then)
        self.batches = 0   # this rank's batches consumed since ``start``
        self._cached: Tuple[int, Optional[np.ndarray], Optional[np.ndarray]] = (-1, None, None)

    def _order(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """(order, keys) of ``epoch``, computed once per epoch."""
        if self._cached[0] != epoch:
            keys = order_keys(self.ids, self.seed, epoch, self.groups, SHARD_WINDOW)
            self._cached = (epoch, visiting_order(self.ids, keys), keys)
        return self._cached[1], self._cached[2]

    @property
    def row(self) -> int:
        """Global samples consumed per batch of every rank (one micro-batch on all ranks)."""
        return self.world_size * self.batch_size

    def _rank_batches(self) -> int:
        """This rank's batches from ``start`` to the end of the epoch (whole global batches only)."""
        return (len(self.ids) - self.start) // self.global_batch * self.global_batch // self.row

    def __len__(self) -> int:
        """This rank's batches left in the epoch."""
        return self._rank_batches() - self.batches

    def plan(self) -> np.ndarray:
        """This rank's sample indices for the rest of the epoch, one row per batch."""
        order, _ = self._order(self.epoch)
        rows = order[self.start:self.start + self._rank_batches() * self.row].reshape(-1, self.world_size,
                                                                                       self.batch_size)
        return rows[self.batches:, self.rank]

    def augment_seeds(self, indices: np.ndarray) -> np.ndarray:
        """A seed per sample from (seed, epoch, its identity): augmentations that do not depend on
        the rank, the worker or where the run was resumed."""
        salt = np.uint64(sample_id(f"augment:{self.seed}:{self.epoch}"))
        with np.errstate(over="ignore"):
            return ((self.ids[indices] ^ salt) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start, self.done, self.batches = epoch, 0, 0, 0

    def consumed(self) -> None:
        """One batch of this rank (so one on every rank) was handed to the trainer."""
        self.batches += 1

    def finished(self) -> None:
        """The epoch's last batch was consumed: the position moves to the next epoch's start."""
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> Dict[str, int]:
        """The position, equal on every rank: epoch, global samples consumed, and the (order key,
        id) of the last one, by which ``load_state_dict`` finds it again."""
        at = self.start + self.batches * self.row
        state = {"epoch": self.epoch, "samples_done": self.done + self.batches * self.row,
                 "global_batch": self.global_batch, "world_size": self.world_size, "batch_size": self.batch_size,
                 "last_key": -1, "last_id": -1}
        if at:
            order, keys = self._order(self.epoch)
            last = order[at - 1]
            state.update(last_key=int(keys[last]), last_id=int(self.ids[last]))
        return state

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Continue where ``state`` was saved, on any world size that keeps the global batch."""
        if state["global_batch"] != self.global_batch:
            raise UserError(f"the checkpoint's global batch is {state['global_batch']} samples, this run's is "
                            f"{self.global_batch}: keep world size x data.batch_size x trainer.accum_steps")
        self.set_epoch(state["epoch"])
        self.done = state["samples_done"]
        if self.done:
            order, keys = self._order(self.epoch)
            self.start = position(self.ids, keys, order, state["last_key"], state["last_id"])


def val_indices(size: int, rank: int, world_size: int) -> np.ndarray:
    """Every ``world_size``-th sample from ``rank``: each one on exactly one rank, no padding."""
    return np.arange(rank, size, world_size)
