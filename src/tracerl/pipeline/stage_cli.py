"""The stage CLI contract, shared by every ``stages/<name>.py``.

Every stage is started the same way, by DVC, by a runner of the flow, or by hand::

    python -m stages.<name> --params params.yaml --out <dir> [--iteration I]
                            [--input NAME=PATH ...]

and exposes ``main(argv: list[str] | None = None) -> int`` (0 on success), which the
in-process runner calls directly. A stage

1. parses its arguments with :func:`parse_stage_args`,
2. loads ``params.yaml`` with :func:`load_stage_params` and reads the sections its
   registry entry declares (:mod:`tracerl.pipeline.registry`; any other read fails),
3. calls the library,
4. writes its outputs and metrics through ``tracerl.pipeline.artifacts.stage_output``
   into ``--out`` (temp folder renamed on success, manifest last),
5. logs step-wise metrics through ``tracerl.tracking.stage_run(...)`` (the orchestrator
   already logs the final ``metrics.json``, so this is optional),
6. returns non-zero (or raises) on failure.

A training stage may run as several ranks (torchrun, :mod:`tracerl.pipeline.launch`): it
joins the group with :func:`tracerl.distributed.stage_ranks`, every rank loads the data
and computes its share, and only rank 0 writes: :func:`rank_output` in place of
``stage_output`` (the other ranks see the same folder for collective checkpoint saves)
and :func:`rank_tracker` for ``stage_run``.

Hyperparameters never travel as flags: ``params.yaml`` is their one source. ``--input``
may repeat a name (e.g. the reward folders of a curriculum window); inputs a stage does
not receive are absent (e.g. no ``curriculum`` input at iteration 0).

Example:
    >>> a = parse_stage_args(["--params", "p.yaml", "--out", "o", "--iteration", "2",
    ...                       "--input", "scored=a", "--input", "scored=b"])
    >>> a.iteration, [str(p) for p in a.inputs["scored"]], a.input("policy") is None
    (2, ['a', 'b'], True)
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StageArgs:
    params: Path
    out: Path
    iteration: int | None
    inputs: dict[str, list[Path]]

    def input(self, name: str) -> Path | None:
        """The single input ``name`` (None if absent; error if given more than once)."""
        paths = self.inputs.get(name, [])
        if len(paths) > 1:
            raise ValueError(f"--input {name} given {len(paths)} times; this stage takes one")
        return paths[0] if paths else None

    def require(self, name: str) -> Path:
        """The single input ``name``; a clear error when it is missing."""
        p = self.input(name)
        if p is None:
            raise ValueError(f"missing --input {name}=<dir>; got inputs {sorted(self.inputs)}")
        return p


def stage_argparser(stage: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m stages.{stage}",
                                 description=f"tracerl stage '{stage}'")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"),
                    help="parameters file (default: params.yaml)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    ap.add_argument("--iteration", type=int, default=None, help="RL iteration (0-based)")
    ap.add_argument("--input", action="append", default=[], metavar="NAME=PATH",
                    help="input artifact folder; may repeat")
    return ap


def bind_inputs(ns: argparse.Namespace, aliases: dict[str, str] | None = None,
                convert=Path) -> argparse.Namespace:
    """Fill a stage's own flags left unset from the flow's ``--input NAME=PATH`` entries:
    ``--input policy=DIR`` sets ``ns.policy`` (``aliases`` maps input names to other
    attributes, e.g. ``{"value": "value_advantages"}``). Explicit flags win.

    Example:
        >>> ap = stage_argparser("x"); _ = ap.add_argument("--policy")
        >>> bind_inputs(ap.parse_args(["--out", "o", "--input", "policy=p"])).policy
        PosixPath('p')
    """
    for item in ns.input:
        name, _, path = item.partition("=")
        key = (aliases or {}).get(name, name)
        if hasattr(ns, key) and getattr(ns, key) is None:
            setattr(ns, key, convert(path))
    return ns


def parse_stage_args(argv: list[str] | None, stage: str = "stage") -> StageArgs:
    """Parse the common stage arguments (exits with usage on bad arguments)."""
    ap = stage_argparser(stage)
    ns = ap.parse_args(argv)
    inputs: dict[str, list[Path]] = {}
    for item in ns.input:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            ap.error(f"--input expects NAME=PATH, got {item!r}")
        inputs.setdefault(name, []).append(Path(path))
    return StageArgs(ns.params, ns.out, ns.iteration, inputs)


# ---------------------------------------------------------------------- guarded params
class UndeclaredParamsRead(RuntimeError):
    """A stage read a params section or key its registry entry does not declare."""


# stage name -> the params entries it read (or only checked) in its latest run; recorded
# in its manifest as params_read / params_checked
_READS: dict[str, set[str]] = {}
_CHECKS: dict[str, set[str]] = {}


def params_reads(stage: str) -> list[str]:
    """The params entries ``stage`` read since its params were loaded (sorted)."""
    return sorted(_READS.get(stage, ()))


def params_checks(stage: str) -> list[str]:
    """The params keys ``stage`` read only to check its input (registry ``checks``)."""
    return sorted(_CHECKS.get(stage, ()))


class _SectionView:
    """One params section of which a stage may read only some keys."""

    def __init__(self, stage: str, section: str, obj: Any, keys: dict[str, str]):
        self._stage, self._section, self._obj, self._keys = stage, section, obj, keys

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        kind = self._keys.get(key)
        if kind is None:
            raise UndeclaredParamsRead(_undeclared(self._stage, f"{self._section}.{key}"))
        log = _READS if kind == "read" else _CHECKS
        log.setdefault(self._stage, set()).add(f"{self._section}.{key}")
        return getattr(self._obj, key)


class StageParams:
    """``tracerl.config.Params`` as one stage may see it: only what its registry entry
    (:mod:`tracerl.pipeline.registry`) declares in ``reads``. Reading anything else
    raises :class:`UndeclaredParamsRead`, so a stage's cache key (which digests exactly
    the declared reads) can never miss a value the stage uses. Every read is recorded
    (:func:`params_reads`; the stage's manifest lists them as ``params_read``)."""

    def __init__(self, stage: str, params: Any):
        from tracerl.pipeline.registry import STAGES

        self._stage, self._params = stage, params
        spec = STAGES.get(stage)
        self._whole: set[str] = set()
        self._keys: dict[str, dict[str, str]] = {}
        for kind, entries in (("check", spec.checks), ("read", spec.reads)):
            for r in entries:
                sec, _, key = r.partition(".")
                if key:
                    self._keys.setdefault(sec, {})[key] = kind
                else:
                    self._whole.add(sec)
        _READS[stage], _CHECKS[stage] = set(), set()

    def __getattr__(self, section: str) -> Any:
        if section.startswith("_"):
            raise AttributeError(section)
        if section in self._whole:
            _READS.setdefault(self._stage, set()).add(section)
            return getattr(self._params, section)
        if section in self._keys:
            return _SectionView(self._stage, section, getattr(self._params, section),
                                self._keys[section])
        raise UndeclaredParamsRead(_undeclared(self._stage, section))


def _undeclared(stage: str, what: str) -> str:
    return (f"stage {stage!r} read params '{what}', which its registry entry does not "
            f"declare: add it to the stage's reads in src/tracerl/pipeline/registry.py "
            f"(then regenerate dvc.yaml: python -m tracerl.pipeline.dvcgen --write)")


def load_stage_params(path: str | Path, stage: str) -> StageParams:
    """Load and validate ``params.yaml`` (every problem listed, as
    :func:`tracerl.config.load_params`) and return the view ``stage`` may read."""
    from tracerl.config import load_params

    return StageParams(stage, load_params(path))


# ---------------------------------------------------------------------- ranks
@contextlib.contextmanager
def rank_output(out_dir: str | Path, *, stage: str, ranks: Any) -> Iterator[Any]:
    """``stage_output`` for a stage run by ``ranks`` (:class:`tracerl.distributed.Ranks`).

    Rank 0 owns the temp folder: it renames it into place and writes metrics and the
    manifest once every rank has left the block. The other ranks get a handle on the same
    folder (``.main`` False) for collective saves (a DeepSpeed checkpoint: each rank
    writes its partition) and write nothing else. On one rank: ``stage_output`` itself.
    """
    from tracerl.pipeline.artifacts import StageOutput, stage_output

    if ranks.world == 1:
        with stage_output(out_dir, stage=stage) as o:
            yield o
        return
    if ranks.main:
        with stage_output(out_dir, stage=stage) as o:
            ranks.broadcast(str(o.dir))
            yield o
            ranks.barrier()  # every rank's files are in the folder before it is hashed
    else:
        o = StageOutput(Path(ranks.broadcast(None)), main=False)
        yield o
        ranks.barrier()


def rank_tracker(ranks: Any):
    """The tracker argument of ``tracerl.tracking.stage_run``: None (the configured one)
    on rank 0, a tracker that records nothing on the other ranks."""
    from tracerl.tracking import NullTracker

    return None if ranks.main else NullTracker()
