"""Crash drills on a real Prefect server and process workers (deployment tracerl/iterate,
tiny fake-stage pipeline): how long until a killed run resumes, its concurrency slot is
free again, and a cancel completes.

    python bench/operator_crash.py --out /tmp/drill            # this checkout ("after")
    python bench/operator_crash.py --repo /tmp/old --out /tmp/drill-before --no-setup

``--repo`` deploys another checkout's prefect.yaml and flow (an older commit, exported
with ``git archive``); ``--no-setup`` skips ``tracerl operator setup`` (older commits do
not have it). Prints one JSON object with every timing (seconds after the kill).

Drills:
1. ``worker``: SIGKILL the worker while a stage runs; the flow process stays.
2. ``worker+flow``: SIGKILL the flow process and the worker; start a new worker and ask
   for a second run at once.
3. ``flow``: SIGKILL the flow process only; its worker stays.
4. ``cancel``: SIGKILL the worker, then cancel the run (``prefect flow-run cancel``
   before, ``tracerl operator cancel`` after).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from prefect_live import REPO, LivePrefect, wait_for  # noqa: E402
from test_flow_fakes import write_fake_stages, write_params  # noqa: E402
from tracerl.pipeline.operator import _alive  # noqa: E402

FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
HOLD = "policy[0]"


def watch(lp: LivePrefect, runs: dict[str, str], t0: float, cap: float,
          until=None, final: tuple[str, ...] = FINAL) -> dict[str, list]:
    """Poll the runs' states every 0.5 s; record each change as (seconds, type, name)."""
    seen: dict[str, list] = {k: [] for k in runs}
    end = time.monotonic() + cap
    while time.monotonic() < end:
        for k, rid in runs.items():
            st = lp.state(rid)
            if not seen[k] or tuple(seen[k][-1][1:]) != st:
                seen[k].append((round(time.monotonic() - t0, 1), *st))
        if until and until(seen):
            break
        if all(s and s[-1][1] in final for s in seen.values()):
            break
        time.sleep(0.5)
    return seen


def first(changes: list, state_type: str, after: float = 0.0) -> float | None:
    return next((t for t, ty, _ in changes if ty == state_type and t >= after), None)


def resumed(changes: list) -> float | None:
    """When the run was Running again after it had left Running."""
    left = False
    for t, ty, _ in changes:
        if ty != "RUNNING":
            left = True
        elif left:
            return t
    return None


def held(lp: LivePrefect, log: Path) -> None:
    wait_for(f"{HOLD} to start", lambda: Path(str(log) + ".held").exists(), 300)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=REPO)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--no-setup", action="store_true")
    ap.add_argument("--cap", type=float, default=420, help="longest wait per drill (s)")
    ap.add_argument("--drills", default="worker,worker+flow,flow,cancel",
                    help="comma-separated subset of the drills, in this order")
    a = ap.parse_args()
    proj = a.out / "proj"
    write_fake_stages(proj)
    write_params(proj / "params.yaml")
    lp = LivePrefect(a.out / "live", proj, {"FAKE_HOLD": HOLD}, repo=a.repo)
    res: dict = {"repo": str(a.repo), "setup": not a.no_setup}
    try:
        t = time.monotonic()
        lp.start_server()
        lp.deploy()
        if not a.no_setup:
            lp.tracerl("operator", "setup")
        res["server_and_deploy_s"] = round(time.monotonic() - t, 1)

        def worker(name: str, log: Path):
            lp.env["FAKE_LOG"] = str(log)
            return lp.start_worker(name)

        drills = set(a.drills.split(","))
        # a crashed run is restarted once the automations are set up: not the end then
        done = FINAL if a.no_setup else ("COMPLETED", "FAILED", "CANCELLED")

        # 1. the worker dies, the flow process stays
        if "worker" in drills:
            log = proj / "d1.log"
            Path(str(log) + ".hold").touch()
            worker("w1", log)
            r1 = lp.run_deployment(run_name="d1")
            held(lp, log)
            lp.kill("w1")
            t0 = time.monotonic()
            Path(str(log) + ".hold").unlink()
            ch = watch(lp, {"d1": r1}, t0, a.cap)
            res["worker"] = {"states": ch["d1"], "stages": log.read_text().split(),
                             "last_logs": lp.run_logs(r1)[-4:]}

        # 2. the flow process and the worker die; a new worker; a second run at once
        if "worker+flow" in drills:
            log = proj / "d2.log"
            Path(str(log) + ".hold").touch()
            worker("w2", log)
            r2 = lp.run_deployment(run_name="d2")
            held(lp, log)
            pid = lp.flow_process(r2)
            os.kill(pid, 9)
            lp.kill("w2")
            t0 = time.monotonic()
            Path(str(log) + ".hold").unlink()
            worker("w3", log)
            r3 = lp.run_deployment(run_name="d2b")
            ch = watch(lp, {"killed": r2, "second": r3}, t0, a.cap, final=done)
            res["worker+flow"] = {
                "states": ch, "stages": log.read_text().split(),
                "killed_left_running_s": next((t for t, ty, _ in ch["killed"] if ty != "RUNNING"),
                                              None),
                "killed_resumed_s": resumed(ch["killed"]),
                "killed_completed_s": first(ch["killed"], "COMPLETED"),
                "second_started_s": first(ch["second"], "RUNNING"),
                "second_completed_s": first(ch["second"], "COMPLETED"),
            }
            lp.kill("w3")

        # 3. the flow process dies, its worker stays
        if "flow" in drills:
            log = proj / "d4.log"
            Path(str(log) + ".hold").touch()
            worker("w5", log)
            r5 = lp.run_deployment(run_name="d4")
            held(lp, log)
            os.kill(lp.flow_process(r5), 9)
            t0 = time.monotonic()
            Path(str(log) + ".hold").unlink()
            ch = watch(lp, {"d4": r5}, t0, min(a.cap, 240), final=done)
            res["flow"] = {"states": ch["d4"], "stages": log.read_text().split(),
                           "resumed_s": resumed(ch["d4"]),
                           "completed_s": first(ch["d4"], "COMPLETED")}
            lp.kill("w5")

        # 4. cancel a run whose worker is gone
        if "cancel" in drills:
            log = proj / "d3.log"
            Path(str(log) + ".hold").touch()
            worker("w4", log)
            r4 = lp.run_deployment(run_name="d3")
            held(lp, log)
            pid = lp.flow_process(r4)
            lp.kill("w4")
            t0 = time.monotonic()
            if a.no_setup:
                lp.cli("flow-run", "cancel", r4)
            else:
                lp.tracerl("operator", "cancel", r4)
            ch = watch(lp, {"d3": r4}, t0, min(a.cap, 180))
            res["cancel"] = {"states": ch["d3"], "cancelled_s": first(ch["d3"], "CANCELLED"),
                             "flow_process_alive_after": pid is not None
                             and _alive(pid)}
            Path(str(log) + ".hold").unlink(missing_ok=True)
    finally:
        lp.stop_all()
    print(json.dumps(res, indent=1))
    (a.out / "result.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
