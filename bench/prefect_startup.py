"""What the DVC ``rl`` stage pays for Prefect: a temporary server per command, or none.

    source scripts/env.sh && python bench/prefect_startup.py [--repeats 3]

``dvc repro`` runs the ``rl`` stage as ``python -m flows.tracerl_flow --stage rl``, a
Prefect flow. Without ``PREFECT_API_URL`` Prefect 3 starts a temporary API server in a
subprocess for that one command (its only supported way to run a flow without a server;
the in-process ephemeral API of Prefect 2 is gone) and stops it at exit. With
``PREFECT_API_URL`` pointing at a running server (``prefect server start``), the command
uses it and starts nothing.

Times, each in a fresh Python process as DVC runs it, a trivial one-task flow
(``python -c``: import Prefect, run the flow, exit): (a) with a temporary server, (b)
against one long-running server started once here (its own start-up is printed apart).
The difference is what each ``rl`` stage run saves when a server is running.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

FLOW = ("from prefect import flow, task\n"
        "@task\ndef t():\n    return 1\n"
        "@flow\ndef f():\n    return t()\n"
        "f()\n")


def timed_flow(env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", FLOW], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    home = tempfile.mkdtemp(prefix="prefect-bench-")
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    temp = [timed_flow(env) for _ in range(a.repeats)]
    print(f"flow command with a temporary server: {statistics.median(temp):.1f} s median "
          f"({', '.join(f'{x:.1f}' for x in temp)})")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None or time.perf_counter() - t0 > 180:
                    raise RuntimeError("prefect server did not start") from None
                time.sleep(0.5)
        print(f"long-running server start-up (paid once): {time.perf_counter() - t0:.1f} s")
        shared = [timed_flow({**env, "PREFECT_API_URL": url}) for _ in range(a.repeats)]
        print(f"flow command against the running server: {statistics.median(shared):.1f} s "
              f"median ({', '.join(f'{x:.1f}' for x in shared)})")
        print(f"saved per DVC rl stage: {statistics.median(temp) - statistics.median(shared):.1f} s")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
