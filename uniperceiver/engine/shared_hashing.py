"""Verifying a checkpoint with every rank's help: each rank hashes a share of its files.

Why: a resume checks every file of the checkpoint once before anything is loaded, so that a damaged
one falls back to the previous checkpoint. Done by rank 0 alone, that is one process reading the
whole checkpoint (at 7B parameters with AdamW about 84 GB) while the others wait. Shared, each rank
reads about 1/N of the bytes. Rank 0 still makes every decision (which run folder, which
checkpoint, what to warn): while it decides, the other ranks serve its hashing requests
(`serve_hashing`) until it says it is done (`SharedHasher.close`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from uniperceiver.evaluation.checkpoints import hash_files

if TYPE_CHECKING:
    from uniperceiver.engine.distributed import DistEnv


def assign_shares(folder: Path, names: list[str], world_size: int) -> list[list[str]]:
    """The files each rank hashes: largest first, each to the rank with the fewest bytes so far
    (deterministic; a file that cannot be stat-ed counts as empty and still gets hashed)."""
    def size(name: str) -> int:
        try:
            return (Path(folder) / name).stat().st_size
        except OSError:
            return 0

    shares: list[list[str]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for name in sorted(names, key=lambda n: (-size(n), n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shares[rank].append(name)
        load[rank] += size(name)
    return shares


class SharedHasher:
    """Rank 0's `HashFiles` for `verify_checkpoint`: every rank hashes its share, rank 0 gets all sums."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env

    def __call__(self, folder: Path, names: list[str], algorithm: str) -> dict[str, str]:
        import torch.distributed as dist

        shares = assign_shares(folder, names, self.env.world_size)
        dist.broadcast_object_list([(str(folder), shares, algorithm)], src=0, group=self.env.group)
        every: list[dict[str, str] | None] = [None] * self.env.world_size
        dist.gather_object(hash_files(folder, shares[0], algorithm), every, dst=0, group=self.env.group)
        return {name: digest for part in every for name, digest in (part or {}).items()}

    def close(self) -> None:
        """Tell the other ranks that rank 0 has decided (they stop serving)."""
        import torch.distributed as dist

        dist.broadcast_object_list([None], src=0, group=self.env.group)


def serve_hashing(env: DistEnv) -> None:
    """Ranks other than 0: hash the share of each request rank 0 sends, until it is done."""
    import torch.distributed as dist

    while True:
        box: list[object] = [None]
        dist.broadcast_object_list(box, src=0, group=env.group)
        if box[0] is None:
            return
        folder, shares, algorithm = box[0]  # type: ignore[misc]
        mine = hash_files(Path(folder), shares[env.rank], algorithm)
        dist.gather_object(mine, None, dst=0, group=env.group)


__all__ = ["SharedHasher", "assign_shares", "serve_hashing"]
