"""One sample list, one global order: the contract every source and backend keeps.

A source (an ImageFolder root or a folder of tar shards) is a list of samples, each with a
stable identity: a 64-bit hash of its name (its path relative to the dataset root, as
``train/<class>/<file>``), the same whether the image sits in a folder or in a shard.

Each epoch's order of the training samples is a function of (seed, epoch) and those
identities alone: every sample gets a sort key, and the epoch visits them by key. So:

- the order is the same for any number of ranks (ranks only take their part of each
  global batch), and a job resumed on another number of GPUs continues the same epoch;
- removing samples (a bad file listed after a crash) keeps the others' relative order, so a
  position kept as the (key, id) of the last consumed sample still says which samples were
  consumed: ``position()`` finds it again in the new list.

Shards add locality: samples sort first by a window of ``window`` shards (the shards
themselves in a seeded order), then by their own key, so all ranks read from a few shards at
a time instead of from all of them.
"""
import hashlib
from typing import List, Optional, Protocol

import numpy as np

MASK64 = (1 << 64) - 1
KEY_BITS = 40  # with groups: low bits hold the sample's own key, high bits its window of shards


class Source(Protocol):
    """A split's samples: names, identities, labels and encoded bytes, in a fixed list order."""

    classes: List[str]
    ids: np.ndarray               # uint64 per sample: ``sample_id(name)``
    labels: np.ndarray            # int64 per sample: indices into ``classes``
    groups: Optional[np.ndarray]  # int64 shard index per sample (None: no locality to keep)

    def __len__(self) -> int: ...

    def read(self, index: int) -> bytes:
        """The encoded image of sample ``index`` (JPEG, PNG, ... bytes as stored)."""

    def name(self, index: int) -> str:
        """Where sample ``index`` lives, for messages: a path, or ``<shard>:<key>``."""


def sample_id(name: str) -> int:
    """The stable identity of the sample named ``name`` (its path relative to the dataset root)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def sample_ids(names: List[str]) -> np.ndarray:
    return np.fromiter((sample_id(n) for n in names), dtype=np.uint64, count=len(names))


def _mix(values: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64's finaliser of ``values ^ salt``: a bijective, well-spread hash of uint64s."""
    z = values.astype(np.uint64) ^ np.uint64(salt & MASK64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _salt(seed: int, epoch: int) -> int:
    return sample_id(f"order:{seed}:{epoch}")


def order_keys(ids: np.ndarray, seed: int, epoch: int, groups: Optional[np.ndarray] = None,
               window: int = 1) -> np.ndarray:
    """Each sample's sort key in epoch ``epoch`` (uint64); ties are broken by the id."""
    salt = _salt(seed, epoch)
    keys = _mix(ids, salt)
    if groups is None:
        return keys
    shards = np.unique(groups)
    shard_rank = np.empty(int(shards.max()) + 1, dtype=np.uint64)
    shard_rank[shards[np.argsort(_mix(shards.astype(np.uint64), ~salt), kind="stable")]] = np.arange(
        len(shards), dtype=np.uint64)
    windows = shard_rank[groups] // np.uint64(max(1, window))
    return (windows << np.uint64(KEY_BITS)) | (keys >> np.uint64(64 - KEY_BITS))


def visiting_order(ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The sample indices sorted by ``keys`` (``order_keys``), ties broken by the id."""
    return np.lexsort((ids, keys))


def epoch_order(ids: np.ndarray, seed: int, epoch: int, groups: Optional[np.ndarray] = None,
                window: int = 1) -> np.ndarray:
    """The sample indices of epoch ``epoch`` in visiting order."""
    return visiting_order(ids, order_keys(ids, seed, epoch, groups, window))


def position(ids: np.ndarray, keys: np.ndarray, order: np.ndarray, last_key: int, last_id: int) -> int:
    """How many samples of ``order`` come at or before the sample (``last_key``, ``last_id``):
    the consumed part of the epoch, found by identity (that sample may itself be gone)."""
    sorted_keys, sorted_ids = keys[order], ids[order]
    lo = int(np.searchsorted(sorted_keys, np.uint64(last_key), side="left"))
    hi = int(np.searchsorted(sorted_keys, np.uint64(last_key), side="right"))
    return lo + int(np.searchsorted(sorted_ids[lo:hi], np.uint64(last_id), side="right"))
