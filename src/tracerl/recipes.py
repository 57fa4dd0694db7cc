"""Recipes: named experiments as overrides of ``params.yaml``.

A recipe is ``recipes/<name>.yaml`` at the project root: only the values it changes,
nested by params section, plus two optional keys of its own:

- ``about``: one line saying what the experiment shows (``tracerl recipes list``);
- ``extends``: another recipe whose overrides apply first (shared settings are stated
  once, in the recipe the arms of an experiment extend).

Everything else in ``params.yaml`` applies unchanged, so a recipe never restates a value.
The same recipe runs through every entry point:

    python -m flows.tracerl_flow --recipe block_ref --seed 1            # here
    prefect deployment run tracerl/iterate -p recipe=block_ref -p seed=1
    dvc exp run -n block_ref $(tracerl recipes dvc block_ref)           # -S key=value ...
    python bench/learning.py --recipes block4 block_ref block_tstar     # arms x seeds

``tracerl recipes show NAME`` prints the merged overrides, ``tracerl recipes dvc NAME``
the ``-S`` arguments of ``dvc exp run``. Unknown sections or keys fail at load like any
params error (:func:`tracerl.config.load_params` validates the merged result).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

RECIPES_DIR = "recipes"
_OWN = ("about", "extends")


class RecipeError(ValueError):
    """A recipe that cannot be read (missing, not a mapping, a cycle of ``extends``)."""


def recipes_dir(root: str | os.PathLike | None = None) -> Path:
    return Path(root or Path.cwd()) / RECIPES_DIR


def available(root: str | os.PathLike | None = None) -> dict[str, str]:
    """``{name: about}`` of every recipe under ``root/recipes``."""
    out = {}
    for f in sorted(recipes_dir(root).glob("*.yaml")):
        raw = yaml.safe_load(f.read_text()) or {}
        out[f.stem] = str(raw.get("about", "")) if isinstance(raw, dict) else ""
    return out


def merge(base: dict, over: dict) -> dict:
    """``over`` merged into ``base`` (nested dicts merged, other values replaced).

    >>> merge({"a": {"x": 1, "y": 2}, "b": 1}, {"a": {"y": 3}})
    {'a': {'x': 1, 'y': 3}, 'b': 1}
    """
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(name: str, root: str | os.PathLike | None = None,
                _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The overrides of recipe ``name`` (its ``extends`` chain applied first).

    Raises:
        RecipeError: no such recipe (the message lists the known ones), a file that is
            not a mapping of sections, or ``extends`` that loops.
    """
    path = recipes_dir(root) / f"{name}.yaml"
    if name in _seen:
        raise RecipeError(f"recipe {name!r}: 'extends' loops ({' -> '.join([*_seen, name])})")
    if not path.is_file():
        known = ", ".join(available(root)) or "none"
        raise RecipeError(f"no recipe {name!r} ({path} does not exist); recipes: {known}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of params sections, got "
                          f"{type(raw).__name__}")
    bad = [k for k, v in raw.items() if k not in _OWN and not isinstance(v, dict)]
    if bad:
        raise RecipeError(f"{path}: top-level keys {bad} are not params sections (a recipe "
                          "nests values by section, e.g. 'rollout: {max_tokens: 48}')")
    base = load_recipe(raw["extends"], root, (*_seen, name)) if raw.get("extends") else {}
    return merge(base, {k: v for k, v in raw.items() if k not in _OWN})


def seeded(seed: int) -> dict[str, Any]:
    """The overrides that make a run of seed ``seed``: the run's seed and the SFT,
    policy and value seeds (every random draw of the pipeline)."""
    return {s: {"seed": seed} for s in ("run", "sft", "policy", "value")}


def dvc_set_params(over: dict[str, Any]) -> list[str]:
    """``dvc exp run`` arguments for ``over``: ``-S section.key=value`` (values in
    YAML/JSON flow syntax, which DVC parses).

    >>> dvc_set_params({"curriculum": {"block_size_schedule": [[5, 8]]}, "run": {"seed": 1}})
    ['-S', 'curriculum.block_size_schedule=[[5, 8]]', '-S', 'run.seed=1']
    """
    out = []
    from tracerl.tracking import flatten_params

    for k, v in flatten_params(over).items():
        val = "null" if v is None else json.dumps(v) if not isinstance(v, str) else v
        out += ["-S", f"{k}={val}"]
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import shlex

    ap = argparse.ArgumentParser(prog="tracerl recipes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the recipes and what each shows")
    for cmd, text in (("show", "the merged overrides of a recipe"),
                      ("dvc", "the -S arguments of `dvc exp run` for a recipe")):
        s = sub.add_parser(cmd, help=text)
        s.add_argument("name")
        s.add_argument("--seed", type=int, default=None)
    a = ap.parse_args(argv)
    if a.cmd == "list":
        for name, about in available().items():
            print(f"{name:18s} {about}")
        return 0
    try:
        over = load_recipe(a.name)
    except RecipeError as e:
        print(f"error: {e}")
        return 1
    if a.seed is not None:
        over = merge(over, seeded(a.seed))
    if a.cmd == "show":
        print(yaml.safe_dump(over, sort_keys=False), end="")
    else:
        print(" ".join(shlex.quote(x) for x in dvc_set_params(over)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
