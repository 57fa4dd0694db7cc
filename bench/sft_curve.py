"""Held-out accuracy along one SFT run: where does SFT's phase change come?

    source scripts/env.sh && python bench/sft_curve.py --params runs/learning-params/learn-s0-sft-code.yaml \\
        --data runs/learn-s0-sft-code/prepare --steps 1000 --every 100 --out runs/sft-curve-s0-code

Runs the SFT stage (``python -m stages.sft``) of a params file with ``sft.steps`` and
mid-run checkpoints every ``--every`` steps, keeps a copy of each checkpoint as the stage
writes it (the stage keeps only the newest, for resuming), then scores every checkpoint
and the final model with the evaluate stage: greedy static decoding on the first
``--tasks`` held-out tasks. Prints ``step accuracy`` lines and writes ``<out>/curve.json``
and ``<out>/curve.png``.
The points are those of one cosine schedule over ``--steps``: a run stopped at step n
(its own schedule annealed by then) ends somewhat higher than the point at n.

Re-running with the same ``--out`` reuses the finished SFT run and evaluations.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml


def train(params: Path, data: Path, out: Path) -> None:
    """The SFT stage, copying each mid-run checkpoint out of its resume folder."""
    proc = subprocess.Popen([sys.executable, "-m", "stages.sft", "--params", str(params),
                             "--data", str(data), "--out", str(out / "sft")],
                            stdout=subprocess.DEVNULL)
    resume = out / ".sft.resume"  # SFTCheckpoints' folder beside the stage output
    try:
        while proc.poll() is None:
            time.sleep(2)
            for step in resume.glob("step_*"):
                dst = out / "steps" / step.name
                if (step / "progress.json").is_file() and not dst.exists():
                    try:  # progress.json is written last: the checkpoint is complete
                        shutil.copytree(step, dst)
                    except OSError:  # replaced by the next one while copying: missed
                        shutil.rmtree(dst, ignore_errors=True)
    finally:
        if proc.poll() is None:
            proc.terminate()
    if proc.returncode:
        raise SystemExit(f"the SFT stage failed (exit {proc.returncode})")


def as_checkpoint(step: Path, final: Path, dst: Path) -> Path:
    """A mid-run checkpoint (module state dict) as a model folder like the final one."""
    import torch
    import transformers

    from tracerl.models.model import load_model, save_model

    if not (dst / "config.json").is_file():
        model, _ = load_model(final)
        state = torch.load(step / "module.pt", map_location="cpu")
        state = {k.removeprefix("lm."): v for k, v in state.items()}  # TokenScorer's lm.
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or missing:
            raise SystemExit(f"{step}: state does not fit the model "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        save_model(model, transformers.AutoTokenizer.from_pretrained(final), dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, required=True, help="a run's params file")
    ap.add_argument("--data", type=Path, required=True, help="the run's prepare folder")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--tasks", type=int, default=300, help="held-out tasks per evaluation")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    p = yaml.safe_load(a.params.read_text())
    # every step runs: no early stop on validation (the curve is what it would decide on)
    p["sft"].update(steps=a.steps, checkpoint_every=a.every, val_every=0, stop_at=0.0)
    p["run"]["tracker"] = "null"
    (a.out / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    final = a.out / "sft" / "checkpoint"
    if not (final / "config.json").is_file():
        train(a.out / "params.yaml", a.data, a.out)
    ev = copy.deepcopy(p)
    ev["evaluate"].update(heldout_size=a.tasks, strategies=["low_confidence_static"],
                          block_sizes=[])
    steps = sorted(a.out.glob("steps/step_*"), key=lambda d: int(d.name.removeprefix("step_")))
    points = [(int(d.name.removeprefix("step_")),
               as_checkpoint(d, final, a.out / "models" / d.name)) for d in steps]
    rows = []
    for n, model in [*points, (a.steps, final)]:
        ev["model"]["init"] = str(model.resolve())
        pf, eo = a.out / f"eval_{n}.yaml", a.out / f"eval_{n}"
        pf.write_text(yaml.safe_dump(ev, sort_keys=False))
        if not (eo / "metrics.json").is_file():
            subprocess.run([sys.executable, "-m", "stages.evaluate", "--params", str(pf),
                            "--input", f"data={a.data}", "--out", str(eo)],
                           check=True, stdout=subprocess.DEVNULL)
        m = json.loads((eo / "metrics.json").read_text())
        rows.append({"step": n, "accuracy": m["heldout.low_confidence_static.accuracy"]})
        print(f"{n} {rows[-1]['accuracy']:.3f}", flush=True)
    (a.out / "curve.json").write_text(json.dumps(rows, indent=1))
    plot(rows, a.out / "curve.png", f"SFT of {a.params.stem}, {a.steps}-step schedule")
    return 0


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [100 * r["accuracy"] for r in rows], marker="o")
    ax.set(xlabel="SFT step", ylabel="held-out accuracy (%, greedy static)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
