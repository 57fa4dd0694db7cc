"""tracerl.pipeline.compare: verdicts on pairs of run folders, built by hand."""

from __future__ import annotations

import json

import polars as pl
import torch
from safetensors.torch import save_file

from tracerl.pipeline.compare import (
    DIFFERS,
    IDENTICAL,
    ONLY_A,
    ONLY_B,
    SAME_CONTENT,
    compare_runs,
    summary_table,
)


def _write(root, *, lr=0.1, seconds=1.0, w=None, table_meta=None, extra=None):
    (root / "s").mkdir(parents=True)
    (root / "s" / "manifest.json").write_text(
        json.dumps({"lr": lr, "nested": {"seconds": seconds, "ok": [1, 2]}}))
    (root / "s" / "pretty.json").write_text(json.dumps({"b": 1, "a": [1.5]}, indent=4)
                                            if table_meta else json.dumps({"a": [1.5], "b": 1}))
    df = pl.DataFrame({"ids": [[1, 2], [3]], "x": [0.5, None]})
    df.write_parquet(root / "s" / "t.parquet", compression="zstd" if table_meta else "snappy")
    save_file({"w": w if w is not None else torch.arange(4, dtype=torch.float32)},
              root / "s" / "m.safetensors")
    if extra:
        (root / extra).write_text("x")


def test_verdicts(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a)
    w = torch.arange(4, dtype=torch.float32)
    w[2] += 0.25
    _write(b, seconds=2.5, w=w, table_meta=True, extra="new.txt")
    v = {x.path: x for x in compare_runs(a, b)}
    assert v["new.txt"].verdict == ONLY_B
    # the manifest differs in exactly the one timing key, named flattened
    assert v["s/manifest.json"].verdict == DIFFERS
    assert v["s/manifest.json"].keys == ("nested.seconds",)
    # formatting and key order differ, the value is the same
    assert v["s/pretty.json"].verdict == SAME_CONTENT
    # another compression: other bytes, the same table
    assert v["s/t.parquet"].verdict == SAME_CONTENT
    assert v["s/m.safetensors"].verdict == DIFFERS
    assert "w (max |diff| 0.25)" in v["s/m.safetensors"].detail
    assert compare_runs(b, a)[0].verdict == ONLY_A
    assert "only in b" in summary_table(list(v.values()))


def test_identical_and_bitwise_tensors(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a)
    _write(b)
    assert {x.verdict for x in compare_runs(a, b)} == {IDENTICAL}
    # -0.0 == 0.0 numerically, not bitwise: weights must match bit for bit
    c = tmp_path / "c"
    _write(c, w=torch.tensor([0.0, 1.0, 2.0, 3.0]))
    _write(tmp_path / "d", w=torch.tensor([-0.0, 1.0, 2.0, 3.0]))
    v = {x.path: x for x in compare_runs(c, tmp_path / "d")}
    assert v["s/m.safetensors"].verdict == DIFFERS


def test_parquet_column_named(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root, x in ((a, 0.5), (b, 0.75)):
        root.mkdir()
        pl.DataFrame({"ids": [1, 2], "x": [x, 1.0]}).write_parquet(root / "t.parquet")
    (v,) = compare_runs(a, b)
    assert v.verdict == DIFFERS and v.detail == "columns differ: x"
