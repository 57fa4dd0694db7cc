"""The process group of a multi-rank stage: join it, know your rank, leave it.

A training stage started by torchrun (:mod:`tracerl.pipeline.launch`) finds ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_*`` in its environment. :func:`stage_ranks`
joins the group with the backend of ``run.device`` (gloo on CPU, NCCL on CUDA, each rank
on GPU ``LOCAL_RANK``) and leaves it at exit. Every rank loads the data and computes its
share of each step; only rank 0 (:attr:`Ranks.main`) writes the stage's outputs and
talks to the tracker.

A stage with DeepSpeed ZeRO (``zero_stage`` 2 or 3) started as one plain process gets a
one-rank group on a free loopback port, so ZeRO runs the same way on one rank as on many.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# what torchrun and the DeepSpeed launcher set for each worker. LOCAL_RANK tells a worker
# from a process that merely runs inside a multi-node job: a scheduler such as Kubeflow's
# PyTorchJob sets RANK / WORLD_SIZE / MASTER_* per node (the rendezvous the runners pass
# to torchrun, tracerl.pipeline.launch), not LOCAL_RANK.
LAUNCHED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in its stage's process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes outputs, metrics and tracking."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: ``cuda`` becomes ``cuda:<local rank>`` in a multi-rank
        group; other devices are shared."""
        if device.type == "cuda" and self.world > 1:
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for on one rank)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def backend_for(device: torch.device) -> str:
    """The collective backend for ``device``: NCCL for CUDA, gloo otherwise.

    Example:
        >>> backend_for(torch.device("cpu")), backend_for(torch.device("cuda", 1))
        ('gloo', 'nccl')
    """
    return "nccl" if device.type == "cuda" else "gloo"


def launched(env=None) -> bool:
    """Whether a launcher (torchrun, deepspeed) started this process as one rank of a group.

    Example:
        >>> launched({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
        False
        >>> launched({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "a",
        ...           "MASTER_PORT": "1"})
        True
    """
    env = os.environ if env is None else env
    return all(env.get(k) for k in LAUNCHED_ENV)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_deepspeed_shm_op() -> None:
    """DeepSpeed JIT-compiles an optional shared-memory all-reduce for CPU process groups
    (minutes on a cold cache, a C++ toolchain needed); gloo does every collective without
    it, so it is not built."""
    with contextlib.suppress(ImportError):
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _leave_group() -> None:
    """Destroy the process group; through DeepSpeed when it used it, so that DeepSpeed
    forgets the groups it derived (a later group in this process starts clean)."""
    import sys

    import torch.distributed as dist

    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None and getattr(comm, "cdb", None) is not None and dist.is_initialized():
        comm.destroy_process_group()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def stage_ranks(device: torch.device, *, zero_stage: int = 0) -> Iterator[Ranks]:
    """Join the stage's process group for the duration (see the module doc).

    Without a launcher and without ZeRO this is one process and no group; a group that
    already exists (a caller set it up) is used as it is and left alone at exit.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield Ranks(dist.get_rank(), dist.get_world_size(),
                    int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        return
    if not launched() and not zero_stage:
        yield Ranks()
        return
    backend = backend_for(device)
    if backend == "gloo":
        _skip_deepspeed_shm_op()
    if launched():
        ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                      int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group(backend, init_method="env://")
        one = {}
    else:  # ZeRO on one plain process: a one-rank group, as a launcher would set it up
        ranks = Ranks()
        one = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port())}
    saved = {k: os.environ.get(k) for k in one}
    os.environ.update(one)
    try:
        if one:
            dist.init_process_group(backend, init_method="env://")
        yield ranks
    finally:
        _leave_group()
        for k, v in saved.items():  # the caller's environment as it was
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
