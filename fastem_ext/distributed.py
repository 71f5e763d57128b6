"""The process's place in a ``torchrun`` job (``torch.distributed``), or a job of one.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` for each process it starts, on one
host or on several (``--nnodes``); without them the process is rank 0 of 1 and no process group
is created. The group carries only small messages (the job's plan, counts, barriers): NCCL on
a CUDA device (each process on ``cuda:LOCAL_RANK``), gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Ranks wait at the end of the job for the slowest one: its shard may take hours longer.
JOB_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Ranks:
    """rank: this process, ``0 <= rank < world_size``; local_rank: its index on this host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def ranks_from_env() -> Ranks:
    """``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as ``torchrun`` sets them; ``Ranks()`` where
    ``WORLD_SIZE`` is unset."""
    if "WORLD_SIZE" not in os.environ:
        return Ranks()
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets "
                         "them)") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} do not describe "
                         "a process of the job")
    return Ranks(rank, world, local)


def rank_device(requested: str | None, ranks: Ranks) -> str | None:
    """The device of this process: ``cuda:LOCAL_RANK`` where CUDA is present and ``requested`` is
    ``None`` or ``cuda`` without an index; otherwise ``requested`` as given. A ``cuda:N`` under
    ``torchrun`` with more than one process is refused: every process would use that one GPU."""
    if (ranks.world_size > 1 and isinstance(requested, str)
            and requested.strip().lower().startswith("cuda:")):
        raise ValueError(f"--device {requested}: under torchrun (WORLD_SIZE={ranks.world_size}) "
                         "every process would use that one GPU; give --device cuda (each "
                         "process on cuda:LOCAL_RANK) or no --device")
    if requested in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{ranks.local_rank}"
    return requested


class ProcessGroup:
    """A context manager that joins the job's process group (created here if it does not exist
    yet, destroyed on exit if it was), for ``broadcast``, ``gather`` and ``barrier``; a no-op for
    one process."""

    def __init__(self, ranks: Ranks, device: torch.device) -> None:
        self.ranks, self.device = ranks, device
        self.created = False

    def __enter__(self) -> ProcessGroup:
        if self.ranks.world_size > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=JOB_TIMEOUT)
            self.created = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.created:
            dist.destroy_process_group()

    def broadcast(self, value: object) -> object:
        """Rank 0's ``value`` (any picklable object), on every rank."""
        if self.ranks.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: object) -> list[object]:
        """Every rank's ``value`` (picklable), in rank order, on every rank; returns once all
        ranks have called it."""
        if self.ranks.world_size == 1:
            return [value]
        values: list[object] = [None] * self.ranks.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        """Return when every rank has called it."""
        if self.ranks.world_size > 1:
            dist.barrier()
