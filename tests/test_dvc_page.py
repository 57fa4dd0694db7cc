"""The offline page of ``dvc plots show`` (tracerl.pipeline.dvc_page): the three libraries
inlined in order, the placeholders dvc-render fills, refusal of scripts that would break
the page, the DVC config it sets, and a real ``dvc plots show`` writing a page with no
CDN script. Runs on stand-in JS files; tests/test_dvc_page_browser.py renders the real
packages in Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tracerl.pipeline import dvc_page
from tracerl.pipeline.dvc_page import PageError, build, install, installed

REPO = Path(__file__).resolve().parents[1]
DVC = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
CDN = "cdn.jsdelivr.net"


def fake_modules(root: Path, bodies: dict[str, str] | None = None) -> Path:
    """``root/node_modules`` with the three packages' build files as stand-ins: each sets
    a global, like the real UMD builds, and ends with a source-map comment."""
    bodies = bodies or {}
    nm = root / "node_modules"
    for i, (pkg, rel) in enumerate(dvc_page.ASSETS):
        (nm / pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        body = bodies.get(pkg, f"window.fake_{pkg.replace('-', '_')} = {i};")
        (nm / pkg / rel).write_text(f"{body}\n//# sourceMappingURL={Path(rel).name}.map\n")
        (nm / pkg / "package.json").write_text(json.dumps({"name": pkg, "version": f"9.{i}.0",
                                                             "license": "BSD-3-Clause"}))
    return nm


def test_page_inlines_the_packages_in_order_with_dvc_placeholders(tmp_path):
    text = build(fake_modules(tmp_path))
    at = [text.index(f"window.fake_{p} = {i};")
          for i, p in enumerate(("vega", "vega_lite", "vega_embed"))]
    assert at == sorted(at)  # vega, then vega-lite (needs vega), then vega-embed
    assert text.index("window.vegaEmbed = function") > at[-1]  # the wrapper after them
    assert text.count("{plot_divs}") == 1 and text.count("{refresh_tag}") == 1
    assert "{scripts}" not in text  # dvc-render fills that one with the CDN tags
    assert "sourceMappingURL" not in text
    assert "vega 9.0.0, vega-lite 9.1.0, vega-embed 9.2.0" in text
    assert "vega-embed 9.2.0 (license BSD-3-Clause)" in text  # their licences, named
    assert not re.search(r"<script[^>]*\bsrc=", text)  # nothing loaded from elsewhere
    assert text.index("{plot_divs}") > text.index("window.vegaEmbed = function")


@pytest.mark.parametrize("bad", ["var s = '</script>';", "var s = '</SCRIPT >';",
                                 "/* <!-- */", "var t = '{plot_divs}';", "x('{scripts}')"])
def test_a_script_that_would_break_the_page_is_refused(tmp_path, bad):
    with pytest.raises(PageError, match="vega-lite 9.1.0 cannot be inlined"):
        build(fake_modules(tmp_path, {"vega-lite": bad}))


def test_missing_packages_say_how_to_install(tmp_path):
    nm = fake_modules(tmp_path)
    (nm / "vega-embed" / "build" / "vega-embed.min.js").unlink()
    with pytest.raises(PageError, match="run `npm ci`"):
        build(nm)


def _project(tmp_path: Path) -> Path:
    (tmp_path / ".dvc").mkdir()
    fake_modules(tmp_path / "web" / "vega")
    return tmp_path


def test_install_writes_the_page_and_points_the_local_dvc_config_at_it(tmp_path):
    root = _project(tmp_path)
    local = root / ".dvc" / "config.local"
    local.write_text("['remote \"store\"']\n    url = /somewhere\n[core]\n    remote = store\n")
    assert installed(root) and "config.local" in " ".join(installed(root))
    page = install(root)
    assert page == root / "web" / "vega" / "page.html"
    assert page.read_text() == build(root / "web" / "vega" / "node_modules")
    from configobj import ConfigObj

    cfg = ConfigObj(str(local))
    assert cfg["plots"]["html_template"] == "../web/vega/page.html"  # DVC: from .dvc/
    assert cfg['remote "store"']["url"] == "/somewhere" and cfg["core"]["remote"] == "store"
    assert installed(root) == []
    # idempotent: a second install rewrites nothing
    before = (page.stat().st_mtime_ns, local.stat().st_mtime_ns)
    install(root)
    assert (page.stat().st_mtime_ns, local.stat().st_mtime_ns) == before
    # a changed package makes the page stale
    fake_modules(root / "web" / "vega", {"vega": "window.fake_vega = 42;"})
    assert any("stale" in p for p in installed(root))


def test_install_needs_a_dvc_project(tmp_path):
    fake_modules(tmp_path / "web" / "vega")
    with pytest.raises(PageError, match="not a DVC project"):
        install(tmp_path)
    assert dvc_page.main(["--root", str(tmp_path)]) == 1


DVC_ENV = {**os.environ, "DVC_NO_ANALYTICS": "1"}


def dvc_plots_project(root: Path, rows: list[dict], evals: list[dict]) -> Path:
    """A DVC project with the repository's dvc.yaml, params.yaml and plot template, and
    the run's curve files ``rows`` / ``evals`` (what the pipeline writes)."""
    import yaml

    for f in ("dvc.yaml", "params.yaml", ".dvc/config", ".dvc/plots/iterations.json"):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / f, root / f)
    run = yaml.safe_load((REPO / "params.yaml").read_text())["run"]
    plots = root / run["runs_dir"] / run["name"] / "plots"
    plots.mkdir(parents=True)
    (plots / "rl_curves.json").write_text(json.dumps(rows))
    (plots / "eval_curve.json").write_text(json.dumps(evals))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return plots


def dvc_plots_show(root: Path, out: str = "dvc_plots") -> str:
    proc = subprocess.run([DVC, "plots", "show", "-o", out], cwd=root, env=DVC_ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (root / out / "index.html").read_text()


def test_dvc_plots_show_writes_the_offline_page_with_every_plot(tmp_path):
    """A real `dvc plots show`: with the local config set, the page has the inlined
    libraries and no CDN script, and one div per declared plot carrying its data; without
    it (no npm), DVC's default page with the CDN, not an error."""
    from tracerl.pipeline.registry import EVAL_PLOTS, PLOTS

    keys = [k for ks in PLOTS.values() for k in ks]
    rows = [{"iteration": i, **{k: i + j / 100 for j, k in enumerate(keys)}} for i in range(3)]
    evals = [{"iteration": 0, "accuracy": 0.25, "model": "sft"},
             {"iteration": 3, "accuracy": 0.5, "model": "final"}]
    dvc_plots_project(tmp_path, rows, evals)
    default = dvc_plots_show(tmp_path, "cdn")  # before install: DVC's page
    assert CDN in default
    fake_modules(tmp_path / "web" / "vega")
    install(tmp_path)
    text = dvc_plots_show(tmp_path)
    assert CDN not in text and "window.fake_vega_embed = 2;" in text
    assert "{plot_divs}" not in text and "{refresh_tag}" not in text
    ids = re.findall(r'<div id = "([^"]+)">', text)
    assert ids == [*PLOTS, *EVAL_PLOTS]  # each plot once: no stage-level duplicates
    for name, want in {**PLOTS, **EVAL_PLOTS}.items():
        start = text.index(f'<div id = "{name}">')
        spec = text[start:].split("var spec = ", 1)[1].split(";\n", 1)[0]
        series = dvc_series(json.loads(spec)["data"]["values"], want)
        assert sorted(series) == sorted(want), name
        for k in want:
            src = evals if name in EVAL_PLOTS else rows
            assert series[k] == [(r["iteration"], r[k]) for r in src], (name, k)


def dvc_series(values: list[dict], keys) -> dict[str, list[tuple]]:
    """``{y key: [(iteration, value)]}`` of a plot's data as DVC hands it to Vega: with
    one y key its rows as they are, with several one row per (key, row) tagged ``field``
    with the value in ``dvc_inferred_y_value``."""
    if len(keys) == 1:
        (k,) = keys
        return {k: [(v["iteration"], v[k]) for v in values if k in v]}
    out: dict[str, list[tuple]] = {}
    for v in values:
        out.setdefault(v["field"], []).append((v["iteration"], v["dvc_inferred_y_value"]))
    return out
