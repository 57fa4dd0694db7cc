"""An offline page for ``dvc plots show``: Vega, Vega-Lite and vega-embed inlined.

    python -m tracerl.pipeline.dvc_page [--check]    (``source scripts/env.sh`` runs it)

``dvc plots show`` writes an HTML page whose ``<head>`` loads Vega, Vega-Lite and
vega-embed from a CDN (dvc-render's ``VegaRenderer.SCRIPTS``), so offline every plot stays
blank. DVC lets a project give its own page (``plots.html_template`` in the DVC config, or
``dvc plots show --html-template FILE``): dvc-render fills ``{plot_divs}`` with one
``<div>`` per plot (an inline ``vegaEmbed('#id', spec)`` call), ``{scripts}`` with the
CDN ``<script src>`` tags and ``{refresh_tag}`` with an optional ``<meta refresh>``
(``dvc_render.html.HTML.embed``; only ``{plot_divs}`` is required). This page has no
``{scripts}``: it carries the three libraries themselves, from the npm packages pinned in
``web/vega/package.json`` + ``package-lock.json`` (installed there by ``npm ci``), so the
page ``dvc plots show`` writes is one self-contained file that draws offline.

The page wraps ``vegaEmbed`` so every plot renders as SVG (vector output, marks in the
DOM: a headless browser can check that each plot drew, tests/test_dvc_page_browser.py),
leaves out the actions that need the internet (Vega Editor), and writes into the plot's
``<div>`` why it is blank: the error when a spec fails, or "no data in this run" when
dvc-render had none of the plot's fields (its spec is then ``{}``; e.g. ``rl_value``
with ``policy.use_value: false``).

:func:`install` writes the page to ``web/vega/page.html`` (not versioned: built from
``node_modules``) and points ``plots.html_template`` at it in ``.dvc/config.local``
(this machine's DVC config, not versioned), so a machine without the npm packages keeps
DVC's default page (CDN) instead of failing on a missing template.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from pathlib import Path

# inlined in this order: vega-lite needs the global `vega`, vega-embed both
ASSETS = (("vega", "build/vega.min.js"), ("vega-lite", "build/vega-lite.min.js"),
          ("vega-embed", "build/vega-embed.min.js"))
JS_DIR = Path("web") / "vega"  # package.json, package-lock.json, node_modules/ (npm ci)
PAGE = JS_DIR / "page.html"
CONFIG_KEY = ("plots", "html_template")
# DVC resolves a relative plots.html_template against the .dvc folder
TEMPLATE_FROM_DVC_DIR = (Path("..") / PAGE).as_posix()
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")  # dvc_render.html.HTML

_SOURCE_MAP = re.compile(r"\n?//# sourceMappingURL=\S*\s*$")

# Runs after vega-embed loaded, before dvc-render's per-plot `vegaEmbed('#id', spec)`.
WRAPPER = """\
(function () {
  var embed = window.vegaEmbed;
  function note(el, cls, text) {
    var div = typeof el === "string" ? document.querySelector(el) : el;
    if (div) {
      var pre = document.createElement("pre");
      pre.className = cls;
      pre.textContent = text;
      div.appendChild(pre);
    }
  }
  window.vegaEmbed = function (el, spec, opt) {
    if (spec && typeof spec === "object" && Object.keys(spec).length === 0) {
      // dvc-render's spec when none of the plot's y fields is in the data
      note(el, "plot-empty", String(el).replace(/^#/, "") + ": no data in this run " +
           "(dvc plots show printed which fields it did not find)");
      return Promise.resolve(null);
    }
    var o = Object.assign({renderer: "svg",
                           actions: {export: true, source: true, compiled: true,
                                     editor: false}}, opt || {});
    return embed(el, spec, o).catch(function (err) {
      note(el, "plot-error", "this plot failed to render: " + err);
      throw err;
    });
  };
})();"""

PAGE_HTML = """\
<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{{refresh_tag}}
<title>DVC plots (offline)</title>
<!-- {licenses}: inlined from web/vega/node_modules by tracerl.pipeline.dvc_page -->
{scripts}
<style>
  body {{ font-family: sans-serif; margin: 12px; }}
  header {{ color: #555; font-size: 13px; margin-bottom: 8px; }}
  main {{ display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }}
  main > div {{ border: 1px solid #ddd; padding: 6px; }}
  .plot-error {{ color: #b00; white-space: pre-wrap; max-width: 40em; }}
  .plot-empty {{ color: #777; white-space: pre-wrap; max-width: 30em; }}
  table {{ border-spacing: 15px; }}
</style>
</head>
<body>
<header>dvc plots show: every plot of dvc.yaml, drawn offline ({versions_html})</header>
<main>
{{plot_divs}}
</main>
</body>
</html>
"""


class PageError(RuntimeError):
    """The npm packages are missing or cannot be inlined safely."""


def _script(name: str, text: str) -> str:
    """``text`` as an inline ``<script>``; refuses what would end or confuse the element
    early (``</script``, ``<!--``: HTML script-data parsing) or what dvc-render would
    replace (its placeholders)."""
    text = _SOURCE_MAP.sub("", text)  # no .map next to the page
    bad = [s for s in ("</script", "<!--") if s in text.lower()]
    bad += [p for p in PLACEHOLDERS if p in text]
    if bad:
        raise PageError(f"{name} cannot be inlined: it contains {', '.join(map(repr, bad))}")
    return f"<script>/* {name} */\n{text}\n</script>"


def build(node_modules: Path) -> str:
    """The page template (text) with the three libraries of ``node_modules`` inlined."""
    node_modules = Path(node_modules)
    scripts, versions, licenses = [], [], []
    for pkg, rel in ASSETS:
        js, meta = node_modules / pkg / rel, node_modules / pkg / "package.json"
        if not js.is_file() or not meta.is_file():
            raise PageError(f"{js} is missing: run `npm ci` in {node_modules.parent} "
                            "(source scripts/env.sh does)")
        info = json.loads(meta.read_text(encoding="utf-8"))
        version = info["version"]
        versions.append(f"{pkg} {version}")
        licenses.append(f"{pkg} {version} (license {info.get('license', 'see its package')})")
        scripts.append(_script(f"{pkg} {version}", js.read_text(encoding="utf-8")))
    scripts.append(_script("tracerl: svg renderer, offline actions, errors shown", WRAPPER))
    text = PAGE_HTML.format(licenses=", ".join(licenses).replace("--", "- -"),
                            versions_html=html.escape(", ".join(versions)),
                            scripts="\n".join(scripts))
    # the page's own placeholders: {plot_divs} (required) and {refresh_tag}, once each;
    # no {scripts}, which dvc-render fills with the CDN tags
    counts = {p: text.count(p) for p in PLACEHOLDERS}
    if counts != {"{plot_divs}": 1, "{scripts}": 0, "{refresh_tag}": 1}:
        raise PageError(f"page placeholders are {counts}")
    return text


def _set_dvc_config(config_local: Path, value: str) -> bool:
    """Set ``[plots] html_template = value`` in ``config_local`` (DVC's configobj file),
    keeping everything else; True when the file changed."""
    from configobj import ConfigObj

    cfg = ConfigObj(str(config_local), encoding="utf-8")
    section, key = CONFIG_KEY
    if cfg.get(section, {}).get(key) == value:
        return False
    cfg.setdefault(section, {})[key] = value
    cfg.write()
    return True


def install(root: Path) -> Path:
    """Build the page from ``root/web/vega/node_modules``, write it to ``root/web/vega/
    page.html`` (only when its text changed) and point DVC at it (``.dvc/config.local``).
    Returns the page's path; raises :class:`PageError` when the packages are missing."""
    root = Path(root)
    if not (root / ".dvc").is_dir():
        raise PageError(f"{root} has no .dvc folder (not a DVC project)")
    text = build(root / JS_DIR / "node_modules")
    page = root / PAGE
    if not page.is_file() or page.read_text(encoding="utf-8") != text:
        tmp = page.with_suffix(".html.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(page)
    _set_dvc_config(root / ".dvc" / "config.local", TEMPLATE_FROM_DVC_DIR)
    return page


def installed(root: Path) -> list[str]:
    """Problems that keep ``dvc plots show`` in ``root`` from drawing offline (empty when
    the page is built, current and configured)."""
    root = Path(root)
    out = []
    try:
        want = build(root / JS_DIR / "node_modules")
    except PageError as e:
        return [str(e)]
    page = root / PAGE
    if not page.is_file() or page.read_text(encoding="utf-8") != want:
        out.append(f"{page} is missing or stale: run python -m tracerl.pipeline.dvc_page")
    try:
        from configobj import ConfigObj

        cfg = ConfigObj(str(root / ".dvc" / "config.local"), encoding="utf-8")
        have = cfg.get(CONFIG_KEY[0], {}).get(CONFIG_KEY[1])
    except Exception as e:  # a config the user broke: say so, never crash the check
        have = f"unreadable ({e})"
    if have != TEMPLATE_FROM_DVC_DIR:
        out.append(f".dvc/config.local has plots.html_template = {have!r}, want "
                   f"{TEMPLATE_FROM_DVC_DIR!r}: run python -m tracerl.pipeline.dvc_page")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tracerl.pipeline.dvc_page", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("."),
                    help="the project (folder with .dvc and web/vega); default: here")
    ap.add_argument("--check", action="store_true",
                    help="only say whether the offline page is built and configured")
    a = ap.parse_args(argv)
    if a.check:
        problems = installed(a.root)
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    try:
        page = install(a.root)
    except PageError as e:
        print(f"offline dvc plots page not built: {e}", file=sys.stderr)
        return 1
    print(f"dvc plots show draws offline: {page} (.dvc/config.local plots.html_template)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
