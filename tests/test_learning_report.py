"""bench/learning_report.py: the statistics and tables of a learning comparison, on
hand-made run folders (the numbers below are derived by hand)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lr():
    spec = importlib.util.spec_from_file_location("learning_report",
                                                  ROOT / "bench" / "learning_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_t_interval_by_hand(lr):
    # xs = 1, 2, 3: mean 2, sd 1, t(0.975, 2 df) = 4.303 -> half width 4.303 / sqrt(3)
    m, lo, hi = lr.t_interval([1.0, 2.0, 3.0])
    assert m == 2.0
    assert lo == pytest.approx(2 - 4.303 / 3 ** 0.5) and hi == pytest.approx(2 + 4.303 / 3 ** 0.5)


def _arm(sft: float, fin: float, dom: dict[str, tuple[float, float]]) -> dict:
    key = "heldout.low_confidence_static.accuracy_{}"
    return {"sft_accuracy": sft, "final_accuracy": fin, "curve": [(1, fin)], "levels": [0],
            "sft_metrics": {key.format(d): a for d, (a, _) in dom.items()},
            "final_metrics": {key.format(d): b for d, (_, b) in dom.items()}}


def _folder(tmp_path: Path) -> tuple[Path, Path]:
    out, runs = tmp_path / "out", tmp_path / "runs"
    seeds = {"0": {"sft_seconds": 1.0, "sft_steps": {"steps": 650.0, "val_accuracy": 0.31,
                                                      "val_step": 650.0, "stopped_early": 1.0},
                   "a": _arm(0.2, 0.4, {"code": (0.1, 0.5)}),
                   "b": _arm(0.2, 0.3, {"code": (0.1, 0.2)})},
             "1": {"sft_seconds": 1.0, "a": _arm(0.3, 0.6, {"code": (0.3, 0.7)}),
                   "b": _arm(0.3, 0.35, {"code": (0.3, 0.4)})}}
    out.mkdir()
    (out / "learning.json").write_text(json.dumps({"params": {}, "seeds": seeds}))
    # arm a: two iterations of 10 s and 30 s; rollout 8 + 12, reward 1 + 3 of which grading
    # 0.5 + 2.5, policy 1 + 15
    rows = [{"iteration": 0, "iteration.wall_seconds": 10.0, "rollout.seconds": 8.0,
             "reward.seconds": 1.0, "reward.grade_seconds": 0.5, "policy.seconds": 1.0,
             "reward.accuracy_code": 0.2},
            {"iteration": 1, "iteration.wall_seconds": 30.0, "rollout.seconds": 12.0,
             "reward.seconds": 3.0, "reward.grade_seconds": 2.5, "policy.seconds": 15.0,
             "reward.accuracy_code": 0.4, "evaluate.accuracy_code": 0.5}]
    (runs / "learn-s0-a" / "plots").mkdir(parents=True)
    # seed 1's SFT metrics only in its run folder (a learning.json from before they were kept)
    (runs / "learn-s1-sft-a" / "sft").mkdir(parents=True)
    (runs / "learn-s1-sft-a" / "sft" / "metrics.json").write_text(json.dumps(
        {"steps": 1500.0, "val_accuracy": 0.2, "val_step": 1500.0, "stopped_early": 0.0}))
    (runs / "learn-s0-a" / "plots" / "rl_curves.json").write_text(json.dumps(rows))
    return out, runs


def test_time_shares_and_domains(lr, tmp_path):
    out, runs = _folder(tmp_path)
    text = lr.report(out, runs, [], [], base="a", domains=["code"])
    # shares over all iterations: rollout 20/40, reward 4/40, no value model, policy 16/40,
    # grading 3/40
    assert "| a | 2 | 20.0 | 50.0% | 10.0% | 0.0% | 40.0% | 7.5% |" in text
    assert "| b |" not in text.split("Where an iteration")[1].split("Curriculum")[0]
    assert "| 0 | 650 | 31.0 | yes |" in text and "| 1 | 1500 | 20.0 | no |" in text
    # per domain: SFT mean (10 + 30) / 2 = 20.0, final (50 + 70) / 2 = 60.0
    assert "| a | 20.0 -> 60.0 (10.0 -> 50.0, 30.0 -> 70.0) |" in text
    # paired by seed: gains a = 20, 30; b = 10, 5 -> differences 10, 25, mean 17.5
    line = next(x for x in text.splitlines() if x.startswith("| b | 2 |"))
    assert "+17.5" in line
    assert (out / "domain_curves.png").is_file() and (out / "train_curves.png").is_file()


def test_equal_time_reads_each_arm_within_the_fastest_arms_time(lr, tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    out.mkdir()
    # a: 3 iterations of 10 s (cumulative 10, 20, 30); b: 3 of 6 s (6, 12, 18): budget 18 s,
    # within which a has done 1 iteration (held-out 0.4) and b all 3 (0.5)
    seeds = {}
    for seed, sft in (("0", 0.2), ("1", 0.3)):
        seeds[seed] = {"a": {**_arm(sft, 0.6, {}), "curve": [[1, 0.4], [2, 0.5], [3, 0.6]]},
                       "b": {**_arm(sft, 0.5, {}), "curve": [[2, 0.45], [3, 0.5]]}}
        for arm, wall in (("a", 10.0), ("b", 6.0)):
            rows = [{"iteration": i, "iteration.wall_seconds": wall} for i in range(3)]
            if seed == "1":  # recorded in learning.json, its run folders not on this machine
                seeds[seed][arm]["iterations"] = rows
                continue
            d = runs / f"learn-s{seed}-{arm}" / "plots"
            d.mkdir(parents=True)
            d.joinpath("rl_curves.json").write_text(json.dumps(rows))
    (out / "learning.json").write_text(json.dumps({"params": {}, "seeds": seeds}))
    for seed in ("0", "1"):
        got = lr.at_budget(runs, seed, seeds[seed], ["a", "b"])
        assert got == {"a": (18.0, 1, 0.4), "b": (18.0, 3, 0.5)}
    text = lr.report(out, runs, [], [], base="a", same_time=True)
    # gains at the budget: a 0.4 - sft, b 0.5 - sft -> a minus b = -10 points on both seeds
    assert "| b | 2 | -10.0 | [-10.0, -10.0] |" in text
