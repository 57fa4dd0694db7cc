"""What did RL change? Held-out answers of the SFT model and of the final policy, by style.

    source scripts/env.sh && python bench/solution_styles.py RUN_DIR [RUN_DIR ...]

The embedded default's SFT corpus mixes worked solutions (column by column, ``7+8=15,
4+3+1=8 \\boxed{85}``) with answer-only targets (``\\boxed{85}``), ``data.sft_answer_fraction``
of them. For each run folder this reads the held-out samples that the pipeline's
``evaluate`` stage wrote for the SFT model (``rl/baseline/evaluate``) and for the final
policy (``evaluate``), first decoding strategy, and prints, per policy: the share of
answer-only responses, the accuracy of each style, and the accuracy per difficulty level.
Nothing is re-sampled: these are the scored responses behind ``dvc metrics show``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

from tracerl.schemas import read_parquet


def styles(samples: Path) -> pl.DataFrame:
    """The scored frame with ``style`` (``answer`` | ``worked``) and ``level`` columns."""
    s = read_parquet(samples, "scored")
    return s.with_columns(
        style=pl.when(pl.col("response_text").str.strip_chars().str.starts_with("\\boxed"))
        .then(pl.lit("answer")).otherwise(pl.lit("worked")),
        level=pl.col("task_id").str.extract(r"^arithmetic-(\d+)-").cast(pl.Int32),
        correct=pl.col("correct").fill_null(False),
    )


def summary(frame: pl.DataFrame) -> dict[str, float]:
    out = {"accuracy": frame["correct"].mean(),
           "answer_only_share": (frame["style"] == "answer").mean()}
    for st in ("worked", "answer"):
        part = frame.filter(pl.col("style") == st)
        out[f"{st}_accuracy"] = part["correct"].mean() if part.height else float("nan")
    for lv, part in sorted(frame.group_by("level"), key=lambda kv: kv[0][0]):
        out[f"level_{lv[0]}_accuracy"] = part["correct"].mean()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--strategy", default="low_confidence_static")
    a = ap.parse_args(argv)
    rows = []
    for run in a.runs:
        for who, folder in (("SFT", run / "rl" / "baseline" / "evaluate"),
                            ("final RL", run / "evaluate")):
            path = folder / f"samples_heldout_{a.strategy}.parquet"
            if not path.exists():
                raise SystemExit(f"no held-out samples at {path}: run the pipeline first")
            rows.append({"run": run.name, "policy": who, **summary(styles(path))})
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
