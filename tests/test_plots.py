"""The offline curves page (`tracerl plots`): every declared curve drawn from its data,
integer iterations, the held-out accuracy from the SFT model to the final policy, no
network resource."""

from __future__ import annotations

import base64
import re

import pytest

from tracerl.pipeline.plots import figures, render_page
from tracerl.pipeline.registry import PLOTS

ROWS = [{"iteration": i, **{k: 0.1 * (i + 1) for keys in PLOTS.values() for k in keys
                            if not k.startswith("value.")}} for i in range(3)]
EVALS = [{"iteration": 0, "model": "sft", "accuracy": 0.4,
          "heldout.static.accuracy": 0.4, "heldout.dynamic.accuracy": 0.38},
         {"iteration": 2, "model": "iter_1", "accuracy": 0.45,
          "heldout.static.accuracy": 0.45, "heldout.dynamic.accuracy": 0.4},
         {"iteration": 3, "model": "final", "accuracy": 0.5,
          "heldout.static.accuracy": 0.5, "heldout.dynamic.accuracy": 0.47}]


def test_every_curve_is_drawn_with_its_points_on_integer_iterations():
    figs = figures(ROWS, EVALS)
    try:
        assert set(figs) == {*PLOTS, "heldout_accuracy"}
        for name, keys in PLOTS.items():
            axes = figs[name].axes
            assert [ax.get_title() for ax in axes] == list(keys)
            for ax, key in zip(axes, keys):
                lines = ax.get_lines()
                if key.startswith("value."):  # no value model in this run: said so
                    assert not lines and "no data" in ax.texts[0].get_text()
                    continue
                assert list(lines[0].get_xdata()) == [0, 1, 2], key
                assert list(lines[0].get_ydata()) == pytest.approx([0.1, 0.2, 0.3]), key
                figs[name].canvas.draw()
                ticks = [t for t in ax.get_xticks() if 0 <= t <= 2]
                assert ticks and all(float(t).is_integer() for t in ticks), (key, ticks)
        (ax,) = figs["heldout_accuracy"].axes
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"heldout.static", "heldout.dynamic"}
        assert list(lines["heldout.static"].get_xdata()) == [0, 2, 3]
        assert {t.get_text() for t in ax.texts} == {"sft 0.400", "final 0.500"}
    finally:
        import matplotlib.pyplot as plt

        plt.close("all")


def test_page_is_self_contained_pngs():
    page = render_page(ROWS, EVALS, "run demo")
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) == len(PLOTS) + 1
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in imgs)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.index('id="heldout_accuracy"') < page.index('id="rl_reward"')  # headline first
