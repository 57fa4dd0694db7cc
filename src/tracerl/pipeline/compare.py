"""Compare two run folders file by file: are two runs of the same params the same run?

Used to show that a runner does not change results (the container runner against the
in-process one, ``tests/test_container_engine.py``), and useful after moving a run between
machines. Every file of either folder gets one verdict:

- ``identical``: the same bytes;
- ``same content``: different bytes, equal content: a parquet table with the same schema
  and values (its footer records the writer), safetensors with the same tensor names,
  dtypes, shapes and values (bitwise), JSON with the same parsed value;
- ``differs``: different content; ``detail`` says where (the differing JSON keys, the
  parquet columns, the tensors and their largest absolute difference);
- ``only in a`` / ``only in b``.

JSON files are compared key by key after flattening (``a.b.c``), so a manifest that
differs only in its wall-clock seconds names just those keys.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IDENTICAL, SAME_CONTENT, DIFFERS, ONLY_A, ONLY_B = (
    "identical", "same content", "differs", "only in a", "only in b")


@dataclass(frozen=True)
class FileVerdict:
    path: str  # relative to the run folders
    verdict: str
    detail: str = ""
    keys: tuple[str, ...] = ()  # JSON: the flattened keys whose values differ


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}{i}."))
        if not value:
            out[prefix.rstrip(".")] = []
        return out
    return {prefix.rstrip("."): value}


def _same_json_value(x: Any, y: Any) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return type(x) is type(y) and x == y


def _compare_json(a: Path, b: Path) -> tuple[str, str, tuple[str, ...]]:
    try:
        fa, fb = _flatten(json.loads(a.read_text())), _flatten(json.loads(b.read_text()))
    except (ValueError, UnicodeDecodeError) as e:
        return DIFFERS, f"not comparable as JSON ({e})", ()
    keys = tuple(sorted(k for k in fa.keys() | fb.keys()
                        if k not in fa or k not in fb or not _same_json_value(fa[k], fb[k])))
    if not keys:
        return SAME_CONTENT, "", ()
    return DIFFERS, f"{len(keys)} key(s) differ: {', '.join(keys[:8])}" + (
        " ..." if len(keys) > 8 else ""), keys


def _compare_parquet(a: Path, b: Path) -> tuple[str, str]:
    import polars as pl

    ta, tb = pl.read_parquet(a), pl.read_parquet(b)
    if ta.schema != tb.schema:
        return DIFFERS, f"schemas differ: {ta.schema} vs {tb.schema}"
    if ta.height != tb.height:
        return DIFFERS, f"rows differ: {ta.height} vs {tb.height}"
    if ta.equals(tb, null_equal=True):
        return SAME_CONTENT, ""
    cols = [c for c in ta.columns if not ta[c].equals(tb[c], null_equal=True)]
    return DIFFERS, f"columns differ: {', '.join(cols)}"


def _compare_safetensors(a: Path, b: Path) -> tuple[str, str]:
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(a), load_file(b)
    if ta.keys() != tb.keys():
        return DIFFERS, f"tensor names differ: {sorted(ta.keys() ^ tb.keys())[:5]}"
    bad = []
    for k in sorted(ta):
        x, y = ta[k], tb[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            bad.append(f"{k} ({x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)})")
        elif not torch.equal(x.view(torch.uint8) if x.dtype.is_floating_point else x,
                             y.view(torch.uint8) if y.dtype.is_floating_point else y):
            diff = (x.double() - y.double()).abs().max().item()
            bad.append(f"{k} (max |diff| {diff:.3g})")
    if not bad:
        metadata_same = _safetensors_header(a) == _safetensors_header(b)
        return SAME_CONTENT, "" if metadata_same else "tensors equal, header metadata differs"
    return DIFFERS, f"{len(bad)} tensor(s) differ: {'; '.join(bad[:4])}"


def _safetensors_header(p: Path) -> Any:
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)).get("__metadata__")


def compare_file(a: Path, b: Path, rel: str = "") -> FileVerdict:
    """The verdict on one pair of files (see the module docstring)."""
    rel = rel or a.name
    if a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes():
        return FileVerdict(rel, IDENTICAL)
    suffix = a.suffix.lower()
    keys: tuple[str, ...] = ()
    if suffix == ".json":
        verdict, detail, keys = _compare_json(a, b)
    elif suffix == ".parquet":
        verdict, detail = _compare_parquet(a, b)
    elif suffix == ".safetensors":
        verdict, detail = _compare_safetensors(a, b)
    else:
        verdict, detail = DIFFERS, f"bytes differ ({a.stat().st_size} vs {b.stat().st_size})"
    return FileVerdict(rel, verdict, detail, keys)


def compare_runs(a: str | os.PathLike, b: str | os.PathLike) -> list[FileVerdict]:
    """One :class:`FileVerdict` per file under either folder, sorted by path."""
    a, b = Path(a), Path(b)
    fa, fb = _files(a), _files(b)
    out = [FileVerdict(r, ONLY_A) for r in fa - fb] + [FileVerdict(r, ONLY_B) for r in fb - fa]
    out += [compare_file(a / r, b / r, r) for r in fa & fb]
    return sorted(out, key=lambda v: v.path)


def summary_table(verdicts: list[FileVerdict]) -> str:
    """A plain-text table: one line per file, its verdict and detail."""
    width = max((len(v.path) for v in verdicts), default=4)
    return "\n".join(f"{v.path:<{width}}  {v.verdict:<12}  {v.detail}".rstrip()
                     for v in verdicts)
