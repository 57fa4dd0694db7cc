"""dvc.yaml, generated from the stage registry (:mod:`tracerl.pipeline.registry`).

    python -m tracerl.pipeline.dvcgen           # print what dvc.yaml must be
    python -m tracerl.pipeline.dvcgen --write   # write it
    python -m tracerl.pipeline.dvcgen --check   # exit 1 when dvc.yaml is stale

Each coarse DVC stage (a part of :data:`~tracerl.pipeline.registry.DVC_PARTS`) gets

- ``params``: the union of what its registry stages read, plus what the flow reads to
  plan it: a stage reading a value means DVC re-runs it when that value changes;
- ``deps``: the output folders of its upstream parts, and its code: the files that the
  stage modules (and, for the RL loop, the flow) import, found by following their
  ``import`` statements (also those inside functions) through ``stages/``, ``flows/`` and
  ``src/tracerl/``; a package whose files are all needed is listed as its folder (a
  ``.py`` file that a module names in a string, e.g. to run it by path, counts as
  imported when it lies beside that module);
- ``outs``: the part's folder and its full metrics file ``metrics/<part>.json`` (a plain
  output: ``dvc metrics show <file>`` still reads it); ``metrics``: only the headline
  (``metrics/headline.json``), so ``dvc metrics show`` and ``dvc exp show`` stay a few
  columns wide; the curve files (``plots/rl_curves.json`` of the RL part,
  ``plots/eval_curve.json`` of evaluate) are plain cached outputs too;
- top-level ``plots``: one per plot of the registry (``PLOTS``, ``EVAL_PLOTS``) over those
  files, drawn with the template ``.dvc/plots/iterations.json`` (written beside dvc.yaml:
  DVC's ``linear`` with whole-number iteration ticks). Each file is drawn only there: as
  a stage-level ``plots`` entry DVC would draw it once more with its default template.
  Offline, ``dvc plots show`` draws through the page of :mod:`tracerl.pipeline.dvc_page`.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml

from tracerl.pipeline.registry import DVC_PARTS, EVAL_PLOTS, PLOTS, STAGES, placement_keys

ROOT = Path(__file__).resolve().parents[3]  # the project: src/tracerl/pipeline/ -> root
RUN = "${run.runs_dir}/${run.name}"
HEADER = """\
# GENERATED from the stage registry (src/tracerl/pipeline/registry.py): do not edit.
# Regenerate after changing a stage's declaration: python -m tracerl.pipeline.dvcgen --write
# (tests/test_pipeline_registry.py fails while this file is stale).
#
# The coarse DAG: prepare -> sft -> rl -> evaluate. DVC decides *whether* a stage re-runs
# (deps, params, outs), Prefect runs the RL loop inside `rl` (a cycle DVC cannot express),
# MLflow records what happened (one parent run for the four stages). Paths come from
# params.yaml (run.runs_dir, run.name) through DVC's own templating.
#   dvc repro                          the whole pipeline on the embedded default
#   dvc exp run -S policy.lr=1e-4      an experiment; re-runs rl and evaluate only
#   dvc metrics show                   the headline: held-out accuracy, SFT vs final policy
#   dvc exp show --only-changed        experiments side by side (params changed + headline)
#   dvc plots show                     every curve (offline once `source scripts/env.sh`
#                                      installed web/vega; else Vega comes from a CDN)
#   tracerl plots                      every curve as one offline page of PNG images
"""


# ---------------------------------------------------------------------- code deps
def _module_file(module: str, root: Path) -> Path | None:
    """The project file of ``module`` (``tracerl.x.y``, ``stages.z``, ``flows.w``)."""
    parts = module.split(".")
    base = root / "src" if parts[0] == "tracerl" else root
    if parts[0] not in ("tracerl", "stages", "flows"):
        return None
    for cand in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path) -> set[str]:
    """Project modules ``path`` imports (anywhere in the file), with their parents."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # submodules
    out = set()
    for n in names:
        parts = n.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def _siblings_named(path: Path) -> set[Path]:
    """``.py`` files beside ``path`` whose names appear as strings in it (read by path)."""
    names = {n.value for n in ast.walk(ast.parse(path.read_text()))
             if isinstance(n, ast.Constant) and isinstance(n.value, str)
             and n.value.endswith(".py") and "/" not in n.value}
    return {path.with_name(n) for n in names if path.with_name(n).is_file()}


def code_closure(modules: Iterable[str], root: Path = ROOT) -> set[Path]:
    """Every project file the ``modules`` import, transitively (relative to ``root``)."""
    todo = [".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 2)]
    seen: set[str] = set()
    files: set[Path] = set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        f = _module_file(m, root)
        if f is None:
            continue
        files.add(f)
        files.update(_siblings_named(f))
        todo.extend(_imports(f) - seen)
    # an empty file (a bare package marker) cannot change what runs; DVC warns about it
    return {f.relative_to(root) for f in files if f.stat().st_size > 0}


def collapse(files: set[Path], root: Path = ROOT) -> list[str]:
    """Files as DVC deps: a package folder whose every ``.py`` file is needed is listed
    as the folder (deepest first), other files one by one."""
    files = set(files)
    out: list[str] = []
    dirs = sorted({f.parent for f in files}, key=lambda d: -len(d.parts))
    for d in dirs:
        if d.name in ("src", "") or d == Path("."):
            continue
        all_py = {p.relative_to(root) for p in (root / d).rglob("*.py") if p.stat().st_size}
        if all_py and all_py <= files | {Path(x) for x in out}:
            files -= all_py
            out = [x for x in out if not Path(x).is_relative_to(d)]
            out.append(str(d))
    return sorted(out + [str(f) for f in files])


# ---------------------------------------------------------------------- dvc.yaml
def _params(reads: Iterable[str]) -> list[str]:
    """DVC's params of ``reads``: whole sections, single keys not in a listed section; a
    section holding a placement key (``rollout.shards``: where a stage runs, never what
    it writes) is listed key by key without it."""
    import dataclasses

    from tracerl.config import Params

    reads, skip = set(reads), placement_keys()
    whole = {r for r in reads if "." not in r}
    out = {r for r in reads if "." not in r or r.split(".")[0] not in whole}
    for sec in {k.split(".")[0] for k in skip} & whole:
        out.discard(sec)
        out.update(f"{sec}.{f.name}" for f in dataclasses.fields(getattr(Params(), sec))
                   if f"{sec}.{f.name}" not in skip)
    return sorted(out - skip)


def dvc_stages(root: Path = ROOT) -> dict:
    stages = {}
    for name, part in DVC_PARTS.items():
        modules = [STAGES.get(s).module for s in part.stages]
        if part.orchestration:
            modules.append("flows.tracerl_flow")
        deps = [f"{RUN}/{u}" for u in part.upstream] + collapse(code_closure(modules, root), root)
        reads = [r for s in part.stages for r in STAGES.get(s).reads] + list(part.flow_reads)
        cmd = f"python -m flows.tracerl_flow --stage {name}"
        out: str | dict = f"{RUN}/{name}"
        entry: dict = {"cmd": cmd if part.prefect else cmd + " --no-prefect",
                       "deps": deps, "params": _params(reads),
                       "outs": [{out: {"persist": True}} if part.persist else out,
                                f"{RUN}/metrics/{name}.json"]}
        # the curve files are cached outputs (so `dvc plots diff REV` reads any revision's)
        # but not stage-level `plots`: DVC would draw each once more, with its default
        # template; the top-level plots below draw them
        if part.headline:
            entry["metrics"] = [f"{RUN}/metrics/headline.json"]
            entry["outs"].append(f"{RUN}/plots/eval_curve.json")
        if part.orchestration:
            entry["outs"].append(f"{RUN}/plots/rl_curves.json")
        stages[name] = entry
    return stages


TEMPLATE = "iterations"  # .dvc/plots/iterations.json: DVC's `linear`, integer x axis


# At most one x tick per iteration: Vega's ``tickMinStep`` alone only caps the tick count
# at span + 1, and d3 then still picks a 0.5 step (domain 0..2, 3 ticks: 0, 0.5, ... drawn
# "0 1 1 2 2" under format "d"); a count <= span makes d3's step >= 1, so whole numbers.
X_TICKS = {"tickMinStep": 1, "format": "d",
           "tickCount": {"expr": "min(ceil(width / 40), max(1, span(domain('x'))))"}}


def iterations_template() -> dict:
    """DVC's ``linear`` Vega-Lite template with whole-number ticks on the x axis (RL
    iterations: never 0.5, each label once), see :data:`X_TICKS`."""
    from dvc_render.vega_templates import LinearTemplate

    def walk(node):
        if isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items()}
            if out.get("field") == "<DVC_METRIC_X>":
                out["axis"] = dict(X_TICKS)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(LinearTemplate.DEFAULT_CONTENT)


X_LABELS = {"rl_curves.json": "RL iteration",
            "eval_curve.json": "RL iterations done (0 = the SFT model)"}


def dvc_plots() -> list[dict]:
    curves = [(name, "rl_curves.json", keys) for name, keys in PLOTS.items()]
    evals = [(name, "eval_curve.json", keys) for name, keys in EVAL_PLOTS.items()]
    out = []
    for name, file, keys in curves + evals:
        title = "held-out accuracy per evaluation" if file == "eval_curve.json" else name
        out.append({name: {"template": TEMPLATE, "title": title, "x": "iteration",
                           "x_label": X_LABELS[file],
                           "y_label": "value" if len(keys) > 1 else keys[0],
                           "y": {f"{RUN}/plots/{file}": list(keys)}}})
    return out


def render(root: Path = ROOT) -> str:
    """The text dvc.yaml must have."""
    body = yaml.safe_dump({"stages": dvc_stages(root)}, sort_keys=False, width=100)
    plots = yaml.safe_dump({"plots": dvc_plots()}, sort_keys=False, width=100)
    return (HEADER + "\n" + body + "\n# learning curves over RL iterations (`dvc plots show`, "
            "or `tracerl plots`); one row per iteration\n" + plots)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tracerl.pipeline.dvcgen", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="write dvc.yaml")
    g.add_argument("--check", action="store_true", help="exit 1 when dvc.yaml is stale")
    a = ap.parse_args(argv)
    text, path = render(), ROOT / "dvc.yaml"
    tpl_text = json.dumps(iterations_template(), indent=2) + "\n"
    tpl = ROOT / ".dvc" / "plots" / f"{TEMPLATE}.json"
    if a.write:
        path.write_text(text)
        tpl.parent.mkdir(parents=True, exist_ok=True)
        tpl.write_text(tpl_text)
        print(f"wrote {path.name} and {tpl.relative_to(ROOT)}")
    elif a.check:
        stale = not tpl.is_file() or tpl.read_text() != tpl_text
        if stale or not path.is_file() or path.read_text() != text:
            print("dvc.yaml is stale: run python -m tracerl.pipeline.dvcgen --write",
                  file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
