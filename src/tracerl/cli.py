"""The ``tracerl`` console command: small helpers around the pipeline.

    tracerl params check [FILE]   validate a params file; print every problem with its fix
    tracerl where [RUN]           where a run's results are (folders, metrics, viewer, MLflow)
    tracerl plots [RUN]           every learning curve as one offline page (plots/index.html)
    tracerl recipes list|show|dvc named experiments (recipes/*.yaml, tracerl.recipes)
    tracerl operator setup        Prefect automation: restart runs whose process died
    tracerl operator runs         the latest runs of the deployment tracerl/iterate
    tracerl operator cancel ID    cancel a flow run, also when its worker is gone

(``python -m tracerl.cli ...`` is the same.) Running the pipeline stays
``bash scripts/run.sh`` / ``dvc repro``; the stages stay ``python -m stages.<name>``.
Exit status: 0 fine, 1 invalid params or no such run, 2 usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _params_check(a: argparse.Namespace) -> int:
    from tracerl.config import ConfigError, load_params

    try:
        p = load_params(a.file)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{a.file}: ok (run '{p.run.name}', {p.run.iterations} iterations, model "
          f"{p.model.init}, tasks {p.data.generator})")
    return 0


def _run_layout(a: argparse.Namespace):
    """``(params, layout)`` of the run ``a.run`` (default ``run.name``), or None after
    saying why (bad params, no such run folder)."""
    from tracerl.config import ConfigError, load_params
    from tracerl.pipeline.layout import RunLayout

    try:
        p = load_params(a.params)
    except (FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    L = RunLayout.from_params(p, name=a.run)
    if not L.root.is_dir():
        runs = Path(p.run.runs_dir)
        known = sorted(d.name for d in runs.iterdir() if d.is_dir()) if runs.is_dir() else []
        print(f"no run folder {L.root} yet; runs there: {', '.join(known) or 'none'}",
              file=sys.stderr)
        return None
    return p, L


def _plots(a: argparse.Namespace) -> int:
    from tracerl.pipeline.plots import write_plots_page

    found = _run_layout(a)
    if found is None:
        return 1
    print(write_plots_page(found[1]))
    return 0


def _where(a: argparse.Namespace) -> int:
    from tracerl.tracking import default_tracking_uri

    found = _run_layout(a)
    if found is None:
        return 1
    p, L = found
    done = L.iterations_done()
    rows = [("run folder", L.root, "every artifact, each with its manifest.json")]
    for name, folder in (("prepare", L.prepare), ("sft", L.sft), ("evaluate", L.evaluate)):
        rows.append((name, folder, "done" if (folder / "manifest.json").is_file() else
                     "not finished"))
    rows.append(("rl", L.rl, f"{len(done)} of {p.run.iterations} iterations done"))
    if L.headline.is_file():
        rows.append(("headline", L.headline, "dvc metrics show"))
    if L.curves.is_file():
        rows.append(("plots", L.plots_page, "tracerl plots writes it; offline"))
    viewer = L.latest_viewer()
    if viewer:
        rows.append(("viewer", viewer[1], f"trajectories of iteration {viewer[0]}, the latest"))
    uri = default_tracking_uri()
    rows.append(("mlflow", uri, f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1"))
    width = max(len(r[0]) for r in rows)
    for label, where, what in rows:
        print(f"{label:<{width}}  {where}  ({what})")
    return 0


def _operator(a: argparse.Namespace) -> int:
    """Deployment operations through Prefect's API (PREFECT_API_URL names the server)."""
    from tracerl.pipeline import operator as op

    try:
        if a.operator_command == "setup":
            for name, aid in op.setup(a.prefect_file).items():
                print(f"automation {aid}  {name}")
        elif a.operator_command == "cancel":
            print(f"flow run {a.run_id}: {op.cancel(a.run_id, grace_s=a.grace)}")
        else:
            for r in op.runs(a.limit):
                print(f"{r['id']}  {r['state']:<14} runs={r['run_count']}  "
                      f"{r['start']}  {r['name']}")
    except op.OperatorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tracerl", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    params = sub.add_parser("params", help="parameters file commands")
    psub = params.add_subparsers(dest="params_command", required=True)
    check = psub.add_parser("check", help="validate a params file, listing every problem")
    check.add_argument("file", nargs="?", default="params.yaml")
    check.set_defaults(func=_params_check)
    for name, func, text in (("where", _where, "where a run's results are"),
                             ("plots", _plots, "write the run's curves as one offline page")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("run", nargs="?", default=None, help="run name (default: run.name)")
        cmd.add_argument("--params", default="params.yaml")
        cmd.set_defaults(func=func)
    sub.add_parser("recipes", help="named experiments: list, show NAME, dvc NAME",
                   add_help=False)
    ops = sub.add_parser("operator", help="operate the Prefect deployment tracerl/iterate")
    osub = ops.add_subparsers(dest="operator_command", required=True)
    st = osub.add_parser("setup", help="create/update the automation that restarts runs "
                                       "whose process died (idempotent)")
    st.add_argument("--prefect-file", default="prefect.yaml")
    cancel = osub.add_parser("cancel", help="cancel a flow run and wait until it is "
                                            "Cancelled (also when its worker is gone)")
    cancel.add_argument("run_id")
    cancel.add_argument("--grace", type=float, default=15.0,
                        help="seconds a live worker gets to stop the run (default 15)")
    ls = osub.add_parser("runs", help="the latest flow runs of tracerl/iterate")
    ls.add_argument("--limit", type=int, default=10)
    ops.set_defaults(func=_operator)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["recipes"]:  # its own parser (tracerl.recipes)
        from tracerl.recipes import main as recipes_main

        return recipes_main(argv[1:])
    a = build_parser().parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
