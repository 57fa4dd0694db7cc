"""Tables and plots of a ``bench/learning.py`` comparison, across its seeds.

    source scripts/env.sh && python bench/learning_report.py docs/results/blocks
        [--runs runs] [--keys b4.low_confidence_static b16.low_confidence_static ...]
        [--levels 6 7 8] [--paired trace_rl] [--domains arithmetic code]

Reads ``<folder>/learning.json`` (written by ``bench/learning.py``) with each arm's
per-iteration metrics (recorded there; for seeds recorded before they were, from the run
folder's ``<runs>/learn-s<seed>-<arm>/plots/rl_curves.json`` where it is on this machine),
prints markdown tables and writes ``<folder>/train_curves.png``:

- held-out accuracy, SFT model -> final policy, per arm: mean over seeds, the gain with
  its spread (min .. max, and the sample standard deviation), and per seed;
- ``--keys``: the final and SFT evaluations' ``heldout.<key>.accuracy`` (and, where the
  evaluation records it, ``forward_per_token``) per arm, mean and min .. max over seeds;
- ``--levels``: accuracy per task level (greedy static), SFT and final, mean over seeds;
- ``--paired ARM``: the difference in held-out gain between ARM and each other arm,
  paired by seed (every arm of a seed starts from the same SFT model), with a 95%
  Student-t confidence interval over the seeds;
- where an iteration's time goes, per arm: the mean wall time of an iteration and the
  shares of rollout, reward (and of it, grading: ``reward.grade_seconds``, the sandbox for
  code tasks) and the policy update;
- ``--equal-time``: the arms on the same training wall-clock budget: per seed the budget
  is the fastest arm's total iteration time (rollout + reward + updates; evaluations are
  not counted), and each arm is read at its last held-out evaluation within it; with
  ``--paired ARM`` the paired differences in gain at that budget;
- ``--domains``: per task domain (``accuracy_<domain>``, e.g. arithmetic and code of a
  mixed pool), held-out accuracy SFT -> final, and a plot of the rollouts' accuracy per
  domain per iteration (``<folder>/domain_curves.png``);
- the curriculum level each iteration sampled at, per arm and seed (one digit each);
- the plot: per arm and seed, the rollouts' accuracy and mean response length per
  iteration, and the token budget in force.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def spread(xs: list[float], scale: float = 100.0, signed: bool = False) -> str:
    """``mean (min .. max)`` of ``xs`` in points."""
    f = "+.1f" if signed else ".1f"
    xs = [scale * x for x in xs]
    rng = f" ({min(xs):{f}} .. {max(xs):{f}})" if len(xs) > 1 else ""
    return f"{statistics.mean(xs):{f}}{rng}"


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """Mean and the 95% Student-t confidence interval of the mean of ``xs`` (n >= 2)."""
    n = len(xs)
    m = statistics.mean(xs)
    half = (T975[n - 2] if n - 1 <= len(T975) else 1.96) * statistics.stdev(xs) / n ** 0.5
    return m, m - half, m + half


def gains_by_arm(seeds: dict, arms: list[str]) -> dict[str, dict[str, float]]:
    """Held-out gain (final - SFT) per arm and seed."""
    return {a: {k: s[a]["final_accuracy"] - s[a]["sft_accuracy"] for k, s in seeds.items()
                if a in s} for a in arms}


def paired(gain: dict[str, dict[str, float]], arms: list[str], base: str,
           title: str) -> list[str]:
    """``base`` minus each arm, paired by seed (``gain``: arm -> seed -> gain), in points,
    with a 95% Student-t interval over the seeds both have."""
    out = ["", title, "",
           "| arm | seeds | mean difference | 95% interval | per seed |", "|---|---:|---:|---|---|"]
    for a in arms:
        if a == base:
            continue
        d = [100 * (g - gain[a][k]) for k, g in gain[base].items() if k in gain[a]]
        if len(d) < 2:
            out.append(f"| {a} | {len(d)} | - | - | - |")
            continue
        m, lo, hi = t_interval(d)
        out.append(f"| {a} | {len(d)} | {m:+.1f} | [{lo:+.1f}, {hi:+.1f}] | "
                   + ", ".join(f"{x:+.1f}" for x in d) + " |")
    return out


def curves(runs: Path, seed: str, arm: str, seeds: dict | None = None) -> list[dict]:
    """Per-iteration metrics of one arm of one seed: as learning.py recorded them in
    learning.json (``iterations``), else from the run folder, else none."""
    rows = (seeds or {}).get(seed, {}).get(arm, {}).get("iterations")
    if rows is not None:
        return rows
    f = runs / f"learn-s{seed}-{arm}" / "plots" / "rl_curves.json"
    return json.loads(f.read_text()) if f.is_file() else []


def time_shares(runs: Path, seeds: dict, arms: list[str]) -> list[str]:
    """Where an iteration's wall time goes, per arm, over all its seeds' iterations."""
    parts = ("rollout", "reward", "value", "policy")
    out = ["", "Where an iteration's time goes (mean over seeds and iterations; shares of the "
           "iteration's wall time, grading is part of reward):", "",
           "| arm | iterations | s / iteration | " + " | ".join(parts) + " | grading |",
           "|---|---:|---:|" + "---:|" * (len(parts) + 1)]
    for a in arms:
        rows = [r for seed in seeds for r in curves(runs, seed, a, seeds)
                if r.get("iteration.wall_seconds")]
        if not rows:
            continue
        wall = sum(r["iteration.wall_seconds"] for r in rows)
        share = [f"{100 * sum(r.get(k, 0.0) for r in rows) / wall:.1f}%"
                 for k in (*(f"{p}.seconds" for p in parts), "reward.grade_seconds")]
        out.append(f"| {a} | {len(rows)} | {wall / len(rows):.1f} | " + " | ".join(share) + " |")
    return out if len(out) > 5 else []


def at_budget(runs: Path, seed: str, s: dict, arms: list[str]) -> dict[str, tuple] | None:
    """Per arm of one seed: (budget s, iterations within it, held-out accuracy there) at
    the fastest arm's total iteration wall time; None if a run folder is missing."""
    cum = {}
    for a in arms:
        rows = curves(runs, seed, a, {seed: s})
        if not rows:
            return None
        t, acc = 0.0, []
        for r in rows:
            t += r.get("iteration.wall_seconds", 0.0)
            acc.append(t)
        cum[a] = acc
    budget = min(c[-1] for c in cum.values())
    out = {}
    for a in arms:  # the curve's points are (iterations done, held-out accuracy)
        within = [(n, x) for n, x in s[a]["curve"] if cum[a][n - 1] <= budget * 1.02]
        n, x = within[-1] if within else (0, s[a]["sft_accuracy"])
        out[a] = (budget, n, x)
    return out


def equal_time(runs: Path, seeds: dict, arms: list[str], base: str | None) -> list[str]:
    per = {seed: at_budget(runs, seed, s, arms) for seed, s in seeds.items()
           if all(a in s for a in arms)}
    per = {k: v for k, v in per.items() if v is not None}
    if not per:
        return []
    out = ["", "On the same training wall-clock budget (per seed: the fastest arm's total "
           "iteration time, evaluations not counted; each arm read at its last held-out "
           "evaluation within it):", "",
           "| arm | budget (s, mean) | iterations within (per seed) | held-out at budget | "
           "gain at budget (points) |", "|---|---:|---|---:|---:|"]
    gain = {a: {k: v[a][2] - seeds[k][a]["sft_accuracy"] for k, v in per.items()} for a in arms}
    for a in arms:
        out.append(f"| {a} | {statistics.mean(v[a][0] for v in per.values()):.0f} | "
                   f"{', '.join(str(v[a][1]) for v in per.values())} | "
                   f"{spread([v[a][2] for v in per.values()])} | "
                   f"{spread(list(gain[a].values()), signed=True)} |")
    if base:
        out += paired(gain, arms, base, f"Difference in gain at the budget, {base} minus each "
                      "arm, paired by seed (points; 95% Student-t interval over seeds):")
    return out


def sft_to_final(seeds: dict, arms: list[str], title: str, cols: dict[str, str],
                 per_seed: bool = False) -> list[str]:
    """A table of held-out metrics (``cols``: header -> metric key), SFT -> final per arm,
    mean over seeds (and each seed's pair with ``per_seed``)."""
    out = ["", title, "", "| arm | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for a in arms:
        rs = [s[a] for s in seeds.values() if a in s]
        cells = []
        for k in cols.values():
            sft = [r["sft_metrics"].get(k) for r in rs]
            fin = [r["final_metrics"].get(k) for r in rs]
            if None in sft + fin:
                cells.append("-")
                continue
            per = ", ".join(f"{100 * x:.1f} -> {100 * y:.1f}" for x, y in zip(sft, fin))
            cells.append(f"{100 * statistics.mean(sft):.1f} -> {100 * statistics.mean(fin):.1f}"
                         + (f" ({per})" if per_seed and len(rs) > 1 else ""))
        out.append(f"| {a} | " + " | ".join(cells) + " |")
    return out


def domain_plot(folder: Path, runs: Path, seeds: dict, arms: list[str],
                domains: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(curves(runs, seed, a, seeds) for a in arms for seed in seeds):
        return
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, d in zip(axes[0], domains):
        for i, a in enumerate(arms):
            for j, seed in enumerate(seeds):
                rows = curves(runs, seed, a, seeds)
                ax.plot([r["iteration"] for r in rows],
                        [r.get(f"reward.accuracy_{d}", float("nan")) for r in rows],
                        color=colors[i % len(colors)], linestyle=["-", "--", ":"][j % 3],
                        label=f"{a} s{seed}")
                ev = [(r["iteration"], r[f"evaluate.accuracy_{d}"]) for r in rows
                      if f"evaluate.accuracy_{d}" in r]
                if ev:
                    ax.plot(*zip(*ev), marker="o", color=colors[i % len(colors)],
                            linestyle="none", alpha=0.7)
        ax.set(xlabel="RL iteration", ylabel="accuracy", title=f"{d}: rollouts (lines)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "domain_curves.png", dpi=110)


def sft_stage(runs: Path, seed: str, s: dict, arms: list[str]) -> dict:
    """The SFT stage's metrics of a seed: recorded by learning.py, else read from the SFT
    run folder (``learn-s<seed>-sft-<first arm>`` for a recipe's own SFT model, else
    ``learn-s<seed>-sft``)."""
    if "sft_steps" in s:
        return s["sft_steps"]
    for name in (f"learn-s{seed}-sft-{arms[0]}", f"learn-s{seed}-sft"):
        f = runs / name / "sft" / "metrics.json"
        if f.is_file():
            return json.loads(f.read_text())
    return {}


def report(folder: Path, runs: Path, keys: list[str], levels: list[int],
           base: str | None = None, domains: list[str] | None = None,
           same_time: bool = False) -> str:
    res = json.loads((folder / "learning.json").read_text())
    seeds = res["seeds"]
    arms = [a for a in next(iter(seeds.values())) if a not in ("sft_seconds", "sft_steps")]
    out = [f"Seeds: {', '.join(seeds)}.", "",
           "| arm | SFT held-out | final held-out | gain (points) | sd of gain | per seed (SFT -> final) |",
           "|---|---:|---:|---:|---:|---|"]
    for a in arms:
        rs = [s[a] for s in seeds.values() if a in s]
        gains = [r["final_accuracy"] - r["sft_accuracy"] for r in rs]
        sd = f"{100 * statistics.stdev(gains):.1f}" if len(gains) > 1 else "-"
        per = ", ".join(f"{100 * r['sft_accuracy']:.1f} -> {100 * r['final_accuracy']:.1f}"
                        for r in rs)
        out.append(f"| {a} | {spread([r['sft_accuracy'] for r in rs])} | "
                   f"{spread([r['final_accuracy'] for r in rs])} | "
                   f"{spread(gains, signed=True)} | {sd} | {per} |")
    stops = {k: sft_stage(runs, k, s, arms) for k, s in seeds.items()}
    stops = {k: v for k, v in stops.items() if "val_step" in v}
    if stops:  # SFT with validation (sft.val_every): where each seed's SFT ended
        out += ["", "SFT per seed: steps run, and the last validation (greedy, RL pool):", "",
                "| seed | SFT steps | validation accuracy | stopped at the threshold |",
                "|---:|---:|---:|---|"]
        out += [f"| {k} | {v['steps']:.0f} | {100 * v['val_accuracy']:.1f} | "
                f"{'yes' if v.get('stopped_early') else 'no'} |" for k, v in stops.items()]
    if base:
        out += paired(gains_by_arm(seeds, arms), arms, base,
                      f"Difference in held-out gain, {base} minus each arm, paired by seed "
                      "(points; 95% Student-t interval over seeds):")
    if same_time:
        out += equal_time(runs, seeds, arms, base)
    if keys:
        out += ["", "Held-out accuracy (%) per decoding, mean (min .. max) over seeds; "
                "forward passes per generated token in brackets (mean):", "",
                "| policy | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        first = arms[0]
        rows = [("SFT", [s[first]["sft_metrics"] for s in seeds.values() if first in s])]
        rows += [(a, [s[a]["final_metrics"] for s in seeds.values() if a in s]) for a in arms]
        for name, ms in rows:
            cells = []
            for k in keys:
                acc = [m.get(f"heldout.{k}.accuracy") for m in ms]
                if any(v is None for v in acc):
                    cells.append("-")
                    continue
                fwd = [m.get(f"heldout.{k}.forward_per_token") for m in ms]
                fw = f" [{statistics.mean(fwd):.2f}]" if all(v is not None for v in fwd) else ""
                cells.append(spread(acc) + fw)
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    if levels:
        out += sft_to_final(
            seeds, arms, "Accuracy per level (%, greedy static), mean over seeds, SFT -> final:",
            {f"level {lv}": f"heldout.low_confidence_static.level{lv}_accuracy" for lv in levels})
    if domains:
        out += sft_to_final(
            seeds, arms, "Held-out accuracy per domain (%, greedy static), SFT -> final, mean "
            "over seeds (per seed):",
            {d: f"heldout.low_confidence_static.accuracy_{d}" for d in domains}, per_seed=True)
        domain_plot(folder, runs, seeds, arms, domains)
    out += time_shares(runs, seeds, arms)
    out += ["", "Curriculum level of each iteration (one digit per iteration):", "",
            "| arm | seed | levels |", "|---|---:|---|"]
    for a in arms:
        for seed, s in seeds.items():
            if a in s:
                out.append(f"| {a} | {seed} | `{''.join(str(v) for v in s[a].get('levels', []))}` |")
    plot(folder, runs, seeds, arms)
    return "\n".join(out)


def plot(folder: Path, runs: Path, seeds: dict, arms: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(curves(runs, seed, a, seeds) for a in arms for seed in seeds):
        return  # the runs are not on this machine: tables only
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, a in enumerate(arms):
        for j, seed in enumerate(seeds):
            rows = curves(runs, seed, a, seeds)
            if not rows:
                continue
            it = [r["iteration"] for r in rows]
            kw = dict(color=colors[i % len(colors)], alpha=0.8,
                      label=f"{a}" if j == 0 else None, linestyle=["-", "--", ":"][j % 3])
            ax1.plot(it, [r.get("reward.accuracy", float("nan")) for r in rows], **kw)
            ax2.plot(it, [r.get("reward.mean_response_tokens", float("nan")) for r in rows], **kw)
            if "rollout.max_tokens" in rows[0]:
                ax2.plot(it, [r["rollout.max_tokens"] for r in rows], color=kw["color"],
                         alpha=0.3, linewidth=1)
    ax1.set(xlabel="RL iteration", ylabel="rollout accuracy (temperature 1)",
            title="accuracy of the iteration's rollouts")
    ax2.set(xlabel="RL iteration", ylabel="tokens",
            title="mean response length (thin: token budget)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(title="arm (seeds: - -- :)")
    fig.tight_layout()
    fig.savefig(folder / "train_curves.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="the --out folder of bench/learning.py")
    ap.add_argument("--runs", type=Path, default=Path("runs"))
    ap.add_argument("--keys", nargs="*", default=[],
                    help="evaluation keys, e.g. b16.low_confidence_static")
    ap.add_argument("--levels", nargs="*", type=int, default=[])
    ap.add_argument("--paired", default=None, metavar="ARM",
                    help="differences in gain against ARM, paired by seed, with 95%% intervals")
    ap.add_argument("--domains", nargs="*", default=[],
                    help="task domains (accuracy_<domain> keys), e.g. arithmetic code")
    ap.add_argument("--equal-time", action="store_true",
                    help="also compare the arms on the same training wall-clock budget")
    a = ap.parse_args(argv)
    if not (a.folder / "learning.json").is_file():
        ap.error(f"{a.folder}/learning.json not found: run bench/learning.py --out {a.folder}")
    print(report(a.folder, a.runs, a.keys, a.levels, a.paired, a.domains, a.equal_time))
    return 0


if __name__ == "__main__":
    sys.exit(main())
