"""Multi-rank stage launches through torchrun (``python -m torch.distributed.run``).

A stage whose registry entry names a ranks key (``Resources.ranks``, e.g. ``policy.ranks``)
runs as that many processes per node when the key's value is above 1. The runners start
it as::

    python -m torch.distributed.run <rendezvous> --nproc-per-node N -m stages.<name> <argv>

Rendezvous (never ssh, no home-made RPC):

- a cluster scheduler that starts one launcher per node sets ``MASTER_ADDR`` and
  ``MASTER_PORT`` (the rank-0 node), ``NODE_RANK`` (or ``RANK``: Kubeflow's PyTorchJob
  numbers its pods that way) and ``NNODES`` (or ``WORLD_SIZE``, the number of nodes in
  the same convention): they become torchrun's ``--nnodes``, ``--node-rank``,
  ``--master-addr`` and ``--master-port`` (static rendezvous);
- without ``MASTER_ADDR`` the stage runs on this node only: ``--standalone`` (torchrun's
  c10d rendezvous on a free local port, so concurrent launches cannot collide).

torchrun sets each worker's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_*``;
the stage joins the process group with the backend of ``run.device``
(:func:`tracerl.distributed.stage_ranks`: gloo on CPU, NCCL on CUDA). Source of the
flags: torchrun's documentation (``torch.distributed.run``, PyTorch 2.x).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tracerl.pipeline.registry import STAGES

LAUNCHER = ("-m", "torch.distributed.run")


def ranks_of(stage: str, params: Any) -> int:
    """Processes per node of ``stage`` under ``params`` (1 for a stage that names no ranks
    key in its registry entry)."""
    key = STAGES.get(stage).resources.ranks
    if not key:
        return 1
    section, _, name = key.partition(".")
    return int(getattr(getattr(params, section), name))


def call_ranks(stage: str, params_path: str | os.PathLike) -> int:
    """:func:`ranks_of` the params file a stage call reads (loaded only for stages
    that may run multi-rank)."""
    if not STAGES.get(stage).resources.ranks:
        return 1
    from tracerl.config import load_params

    return ranks_of(stage, load_params(Path(params_path)))


def rendezvous_args(env: Mapping[str, str] | None = None) -> list[str]:
    """torchrun's rendezvous flags from a scheduler's environment (see the module doc).

    Example:
        >>> rendezvous_args({})
        ['--standalone', '--nnodes', '1']
        >>> rendezvous_args({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
        ...                  "NODE_RANK": "1", "NNODES": "2"})
        ['--nnodes', '2', '--node-rank', '1', '--master-addr', '10.0.0.1', '--master-port', '29500']
    """
    env = os.environ if env is None else env
    addr = env.get("MASTER_ADDR", "")
    if not addr:
        return ["--standalone", "--nnodes", "1"]
    nnodes = env.get("NNODES") or env.get("WORLD_SIZE") or "1"
    node_rank = env.get("NODE_RANK") or env.get("RANK") or "0"
    problems = [f"{k}={v!r} is not an integer" for k, v in
                (("NNODES/WORLD_SIZE", nnodes), ("NODE_RANK/RANK", node_rank),
                 ("MASTER_PORT", env.get("MASTER_PORT", "29500"))) if not str(v).isdigit()]
    if not problems and int(node_rank) >= int(nnodes):
        problems.append(f"node rank {node_rank} is not below the number of nodes {nnodes}")
    if problems:
        raise ValueError("multi-node rendezvous from the environment: " + "; ".join(problems))
    return ["--nnodes", nnodes, "--node-rank", node_rank, "--master-addr", addr,
            "--master-port", env.get("MASTER_PORT", "29500")]


def torchrun_command(python: str, module: str, argv: list[str], nproc: int,
                     env: Mapping[str, str] | None = None) -> list[str]:
    """The command that runs ``python -m <module> <argv>`` as ``nproc`` ranks per node.

    Example:
        >>> torchrun_command("python", "stages.policy", ["--out", "o"], 2, env={})
        ... # doctest: +NORMALIZE_WHITESPACE
        ['python', '-m', 'torch.distributed.run', '--standalone', '--nnodes', '1',
         '--nproc-per-node', '2', '-m', 'stages.policy', '--out', 'o']
    """
    if nproc < 1:
        raise ValueError(f"ranks must be >= 1, got {nproc}")
    return [python, *LAUNCHER, *rendezvous_args(env), "--nproc-per-node", str(nproc),
            "-m", module, *argv]


def stage_command(python: str, module: str, argv: list[str], nproc: int,
                  env: Mapping[str, str] | None = None) -> list[str]:
    """``python -m <module> <argv>`` for one rank, else :func:`torchrun_command`."""
    if nproc == 1:
        return [python, "-m", module, *argv]
    return torchrun_command(python, module, argv, nproc, env)
