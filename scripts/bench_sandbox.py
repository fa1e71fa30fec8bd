"""Benchmark the sandbox: executions per second, one at a time vs a pool.

Usage: python scripts/bench_sandbox.py [--n 40] [--workers 2 4] [--append BENCHMARKS.md]

Two workloads: a trivial program (``print(1)``) and a test-running program (a
solution checked against 20 ``assert`` tests through ``call_function``, the way
the ``code_feedback`` stage runs it). Prints a Markdown table; ``--append`` adds
it as the "## Sandbox" section of the given file (with command, machine, date).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reward.sandbox import SandboxLimits, SandboxPool, call_function, isolation_info, run_code  # noqa: E402

SOLUTION = """
def is_prime(n):
    if n < 2:
        return False
    d = 2
    while d * d <= n:
        if n % d == 0:
            return False
        d += 1
    return True

def run_test(t):
    exec(t, globals())
    return True
"""
TESTS = [f"assert is_prime({n}) == {all(n % d for d in range(2, n)) and n > 1}" for n in range(1, 21)]


def bench(n: int, workers: list[int]) -> list[dict]:
    """Measure executions/s for both workloads, serially and with pools of each size in ``workers``."""
    lim = SandboxLimits(timeout_s=20)
    rows = []
    for name, serial_fn, pool_fn in [
        ("trivial `print(1)`",
         lambda: run_code("print(1)", limits=lim).status,
         lambda p: [r.status for r in p.run_many(["print(1)"] * n)]),
        ("20 tests via call_function",
         lambda: call_function(SOLUTION, "run_test", TESTS, limits=lim)[0].status,
         lambda p: [r.status for r, _ in p.call_many([(SOLUTION, "run_test", TESTS)] * n)]),
    ]:
        serial_fn()  # warm-up (isolation probe, page cache)
        t = time.perf_counter()
        st = [serial_fn() for _ in range(n)]
        serial = n / (time.perf_counter() - t)
        assert set(st) == {"ok"}, st
        row = {"workload": name, "serial": serial}
        for w in workers:
            with SandboxPool(workers=w, limits=lim) as pool:
                t = time.perf_counter()
                st = pool_fn(pool)
                row[w] = n / (time.perf_counter() - t)
            assert set(st) == {"ok"}, st
        rows.append(row)
    return rows


def main() -> int:
    """Run the benchmark and print (and optionally append) the Markdown section."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40, help="executions per measurement")
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4], help="pool sizes to measure")
    ap.add_argument("--append", default=None, help="Markdown file to append the section to")
    a = ap.parse_args()
    rows = bench(a.n, a.workers)
    info = isolation_info()
    cmd = "python scripts/bench_sandbox.py " + " ".join(sys.argv[1:])
    lines = [
        "## Sandbox",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}; isolation mode `{info['mode']}` "
        f"(netns {info['netns']}, pidns {info['pidns']}, pids cgroup {bool(info['pids_cgroup'])}, "
        f"memory cgroup {bool(info['memory_cgroup'])}); load average before: "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}  ",
        f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"| workload ({a.n} executions) | one at a time (exec/s) | "
        + " | ".join(f"pool of {w} (exec/s, speed-up)" for w in a.workers) + " |",
        "|---|---:|" + "---:|" * len(a.workers),
    ]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['serial']:.1f} | "
                     + " | ".join(f"{r[w]:.1f} ({r[w] / r['serial']:.2f}x)" for w in a.workers) + " |")
    lines.append("")
    lines.append("Each execution is a fresh launcher process, new mount/PID/network namespaces, a tmpfs root, "
                 "a per-run cgroup and a Python start-up; the pool drives that many processes at once from threads.")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.append:
        p = Path(a.append)
        prev = p.read_text() if p.exists() else "# Benchmarks\n"
        p.write_text(prev.rstrip("\n") + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
