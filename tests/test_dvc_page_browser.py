"""`dvc plots show` drawn by a real headless Chromium with no network: the page built from
the npm packages (web/vega, tracerl.pipeline.dvc_page) draws every declared plot, one
line per y key through every iteration, whole-number iteration ticks, and says "no data"
where the default config has none (``rl_value`` without a value model).

Marked ``browser``; skips when Chromium (``TRACERL_CHROMIUM``, or chromium /
chromium-browser / google-chrome on PATH) or the npm packages (``source scripts/env.sh``
runs ``npm ci`` in web/vega) are missing. Run: ``python -m pytest -m browser -n 1``
(Chromium on Debian: ``apt-get install chromium``, or ``TRACERL_INSTALL_CHROMIUM=1 source
scripts/env.sh`` as root)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from test_dvc_page import REPO, dvc_plots_project, dvc_plots_show
from tracerl.pipeline import dvc_page
from tracerl.pipeline.registry import EVAL_PLOTS, PLOTS

pytestmark = pytest.mark.browser

NODE_MODULES = REPO / dvc_page.JS_DIR / "node_modules"
# no network: every request goes to a closed local port (file:// pages are not proxied)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>")


def chromium() -> str | None:
    named = os.environ.get("TRACERL_CHROMIUM")
    if named:
        return shutil.which(named)  # a path or a name; None when not an executable
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser() -> str:
    exe = chromium()
    if exe is None:
        pytest.skip("no Chromium (TRACERL_CHROMIUM, chromium, google-chrome): "
                    "apt-get install chromium, or TRACERL_INSTALL_CHROMIUM=1 source "
                    "scripts/env.sh as root")
    try:
        dvc_page.build(NODE_MODULES)
    except dvc_page.PageError as e:
        pytest.skip(f"no Vega packages for the offline page ({e})")
    return exe


def render(exe: str, page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Chromium on ``page`` with a fresh profile, after scripts ran (virtual time)."""
    profile.mkdir()
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                           "--virtual-time-budget=15000", *extra, page.as_uri()],
                          capture_output=True, text=True, timeout=180)


def plot_dom(dom: str) -> dict[str, str]:
    """``{plot id: its rendered <div>}`` of the page body."""
    main = dom[dom.index("<main>"):dom.index("</main>")]
    ids = re.findall(r'<div id="([^"]+)"', main)
    cuts = [main.index(f'<div id="{i}"') for i in ids] + [len(main)]
    return {i: main[a:b] for i, a, b in zip(ids, cuts, cuts[1:])}


def lines(div: str) -> list[tuple[str, int]]:
    """The raw-data lines of a plot drawn with .dvc/plots/iterations.json (its second
    layer, ``layer_1``): (aria label, number of vertices of the SVG path)."""
    out = []
    for g in re.findall(r'<g class="mark-line role-mark layer_1_marks"[^>]*>(.*?)</g>', div):
        for label, d in re.findall(r'<path aria-label="([^"]*)"[^>]*? d="([^"]*)"', g):
            out.append((label, len(re.findall(r"[ML]", d))))
    return out


def x_tick_labels(div: str) -> list[str]:
    axis = div[div.index('aria-label="X-axis'):]
    group = re.search(r'<g class="mark-text role-axis-label"[^>]*>(.*?)</g>', axis).group(1)
    return re.findall(r"<text[^>]*>([^<]*)</text>", group)


def _run(tmp_path: Path, browser: str, keys: list[str], iterations: int):
    rows = [{"iteration": i, **{k: 1 + i + j / 10 for j, k in enumerate(keys)}}
            for i in range(iterations)]
    evals = [{"iteration": 0, "accuracy": 0.25, "model": "sft"},
             {"iteration": 1, "accuracy": 0.375, "model": "iter_0"},
             {"iteration": iterations, "accuracy": 0.5, "model": "final"}]
    root = tmp_path / "proj"
    root.mkdir()
    dvc_plots_project(root, rows, evals)
    (root / dvc_page.JS_DIR).mkdir(parents=True)
    (root / dvc_page.JS_DIR / "node_modules").symlink_to(NODE_MODULES)
    dvc_page.install(root)
    text = dvc_plots_show(root)
    assert "cdn.jsdelivr.net" not in text and not re.search(r"<script[^>]*\bsrc=", text)
    netlog = tmp_path / "net.json"
    r = render(browser, root / "dvc_plots" / "index.html", tmp_path / "profile", "--dump-dom",
               f"--log-net-log={netlog}")
    assert r.returncode == 0 and "<main>" in r.stdout, r.stderr[-2000:]
    # nothing the page asked for went out (Chromium's own background calls may appear)
    urls = re.findall(r'"url":"([^"]*)"', netlog.read_text()) if netlog.exists() else []
    assert not [u for u in urls if re.search(r"jsdelivr|unpkg|vega", u)], urls
    return plot_dom(r.stdout), rows, evals


def test_every_plot_draws_every_key_through_every_iteration(tmp_path, browser):
    keys = [k for ks in PLOTS.values() for k in ks]
    # 3 iterations (0..2) and evaluations at 0, 2, 3: small spans, where a plain
    # tickMinStep still draws 0.5 ticks
    plots, rows, evals = _run(tmp_path, browser, keys, iterations=3)
    assert list(plots) == [*PLOTS, *EVAL_PLOTS]
    for name, want in {**PLOTS, **EVAL_PLOTS}.items():
        div = plots[name]
        assert "plot-error" not in div and "plot-empty" not in div, name
        assert 'class="marks"' in div and "<svg" in div, name  # the svg renderer drew
        drawn = lines(div)
        n = len(evals) if name in EVAL_PLOTS else len(rows)
        if len(want) == 1:
            assert [v for _, v in drawn] == [n], (name, drawn)
        else:  # one line per key, told apart by its field
            got = {re.search(r"field: ([^;]+)", label).group(1): v for label, v in drawn}
            assert got == {k: n for k in want}, (name, drawn)
        ticks = x_tick_labels(div)  # whole iterations, each once (no 0.5 tick shown "1")
        xs = sorted({r["iteration"] for r in (evals if name in EVAL_PLOTS else rows)})
        assert ticks == [str(i) for i in range(xs[0], xs[-1] + 1)], (name, ticks)
        # the last point of each line is marked (the template's circle layer)
        assert div.count('aria-roledescription="circle"') == len(want), name


def test_default_config_plots_say_which_has_no_data(tmp_path, browser):
    """With ``policy.use_value: false`` (the default) the curves have no ``value.*``:
    DVC hands that plot an empty spec; the page says so and draws the rest."""
    keys = [k for ks in PLOTS.values() for k in ks if not k.startswith("value.")]
    plots, _, _ = _run(tmp_path, browser, keys, iterations=2)
    assert "rl_value: no data in this run" in plots["rl_value"]
    assert "<svg" not in plots["rl_value"]
    for name in [n for n in (*PLOTS, *EVAL_PLOTS) if n != "rl_value"]:
        assert lines(plots[name]) and "plot-" not in plots[name], name


def test_screenshot_of_the_page_offline(tmp_path, browser):
    """A full page screenshot renders (what docs/images/dvc_plots.png was made with)."""
    keys = [k for ks in PLOTS.values() for k in ks]
    _run(tmp_path, browser, keys, iterations=3)
    shot = tmp_path / "shot.png"
    r = render(browser, tmp_path / "proj" / "dvc_plots" / "index.html", tmp_path / "p2",
               f"--screenshot={shot}", "--window-size=1200,900")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 900)
    # the lines' colour (dvc-render's first: #945dd6) covers a visible part of the page
    purple = sum(1 for px in img.getdata()
                 if abs(px[0] - 0x94) + abs(px[1] - 0x5d) + abs(px[2] - 0xd6) < 60)
    assert purple > 2000, purple
