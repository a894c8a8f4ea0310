"""Dataset roots in the stored formats other than a folder (the ``dataset`` fixture runs over them)."""
from pathlib import Path

from data.make_shards import convert, parse_size


def as_shards(root: Path) -> Path:
    """``root`` converted by ``python -m data.make_shards`` into shards of a few images each (so the
    order's shard windows matter), next to it."""
    dst = root.parent / f"{root.name}-shards"
    convert(str(root), str(dst), shard_size=parse_size("6kB"), log=lambda message: None)
    return dst
