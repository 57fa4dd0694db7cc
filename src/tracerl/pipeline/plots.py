"""The learning curves of a run as one offline page: ``<run>/plots/index.html``.

    tracerl plots [RUN]          (python -m tracerl.cli plots)

``dvc plots show`` renders through Vega-Lite loaded from a CDN, so its page stays blank
offline. This page draws the same curves with matplotlib and embeds them as PNG images:
no script, no network, it opens from disk and as an MLflow artifact.

One row per plot of :data:`~tracerl.pipeline.registry.PLOTS` (``plots/rl_curves.json``,
one panel per metric, since loss, KL and entropy live on different scales), then the
held-out accuracy per evaluation (``plots/eval_curve.json``: the SFT model at 0, every
``run.eval_every`` iterations, the final policy), one line per benchmark and decoding
strategy. Iterations are integers on every axis. A panel without data says so (e.g.
``value.*`` with ``policy.use_value: false``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tracerl.pipeline.registry import PLOTS


def _points(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(int(r["iteration"]))
            ys.append(float(v))
    return xs, ys


def figures(rows: Sequence[Mapping[str, Any]], evals: Sequence[Mapping[str, Any]]) -> dict:
    """``{plot name: matplotlib Figure}``: every plot of ``PLOTS`` over the curve rows,
    and ``heldout_accuracy`` over the evaluation rows (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = {}
    for name, keys in PLOTS.items():
        fig, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys), 2.6), squeeze=False)
        for ax, key in zip(axes[0], keys):
            xs, ys = _points(rows, key)
            ax.set_title(key, fontsize=9)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("RL iteration", fontsize=8)
            ax.tick_params(labelsize=7)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=2.5, linewidth=1.2)
            else:
                ax.text(0.5, 0.5, "no data in this run", ha="center", va="center",
                        transform=ax.transAxes, color="grey")
        fig.suptitle(name, fontsize=10)
        fig.tight_layout()
        out[name] = fig
    fig, ax = plt.subplots(figsize=(6.6, 3.2))
    keys = sorted({k for r in evals for k in r if k.endswith(".accuracy")}) or ["accuracy"]
    for key in keys:
        xs, ys = _points(evals, key)
        if xs:
            ax.plot(xs, ys, marker="o", label=key.removesuffix(".accuracy"))
    for r in evals:
        if r.get("model") in ("sft", "final") and isinstance(r.get("accuracy"), (int, float)):
            ax.annotate(f"{r['model']} {r['accuracy']:.3f}", (r["iteration"], r["accuracy"]),
                        textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("RL iterations done (0 = the SFT model)", fontsize=8)
    ax.set_ylabel("held-out accuracy", fontsize=8)
    ax.tick_params(labelsize=7)
    if ax.get_lines():
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no evaluation finished yet", ha="center", va="center",
                transform=ax.transAxes, color="grey")
    ax.set_title("heldout_accuracy", fontsize=10)
    fig.tight_layout()
    out["heldout_accuracy"] = fig
    return out


def render_page(rows: Sequence[Mapping[str, Any]], evals: Sequence[Mapping[str, Any]],
                title: str) -> str:
    """The page: the held-out accuracy first, then every learning curve, as PNGs inline."""
    import matplotlib.pyplot as plt

    figs = figures(rows, evals)
    parts = []
    for name in ["heldout_accuracy", *PLOTS]:
        buf = io.BytesIO()
        figs[name].savefig(buf, format="png", dpi=90)
        plt.close(figs[name])
        img = base64.b64encode(buf.getvalue()).decode()
        parts.append(f'<h3 id="{name}">{name}</h3>\n<img alt="{name}" '
                     f'src="data:image/png;base64,{img}">')
    style = "body { font-family: sans-serif; margin: 1.5em; } img { max-width: 100%; }"
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{style}</style></head><body>\n"
            f"<h2>{html.escape(title)}</h2>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_plots_page(layout) -> Path:
    """Write ``<run>/plots/index.html`` from the run's curves and evaluations (a
    :class:`~tracerl.pipeline.layout.RunLayout`); returns its path."""
    from tracerl.pipeline.driver import eval_curve

    rows = json.loads(layout.curves.read_text()) if layout.curves.is_file() else []
    page = layout.plots_page
    page.parent.mkdir(parents=True, exist_ok=True)
    text = render_page(rows, eval_curve(layout), f"run {layout.root.name}: learning curves")
    tmp = page.with_name(f".{page.name}.tmp")
    tmp.write_text(text)
    tmp.replace(page)
    return page
