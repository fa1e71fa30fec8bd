"""Run untrusted (model-written) Python code in a contained, throw-away process.

Input: source code (plus optional stdin text and extra files), limits. Output: a
``SandboxResult`` with status ``ok`` | ``error`` | ``timeout`` | ``memory`` | ``killed``,
the exit code, truncated stdout/stderr, wall seconds. ``call_function`` calls one function
of a source on a list of JSON inputs, or (``func_name=RUN_TESTS``) runs test statements
against it, and returns one value / verdict per input; ``SandboxPool`` runs many
executions in parallel (threads driving processes).
CLI: ``posttrain sandbox run FILE.py [--timeout S] [--memory-mb M]`` prints one JSON
object; ``posttrain sandbox info`` prints what isolation this machine allows.

How one execution is contained (mode ``namespaces``, used when we are root and
``unshare`` works, as measured on the project machine):

* a launcher process (``sandbox_launcher.py`` run with ``python -I -S``, clean
  empty environment, own session) joins the per-run cgroups (``reward.sandbox_cgroup``:
  pids, and memory where one can be made), then ``unshare``s new mount, PID, network,
  IPC, UTS and cgroup namespaces;
* the namespace's PID 1 (non-dumpable) builds a new root on a size-limited tmpfs holding
  only read-only, nosuid bind mounts of ``/usr`` (and the ``/bin``, ``/lib*`` links) and
  the Python installation, a private ``/proc`` mounted ``hidepid=invisible`` (the program
  sees its own processes only), ``/dev/{null,zero,urandom}`` and the work directory
  ``/sandbox``; it ``chroot``s there. Project files, ``/root``, ``/home``, ``/tmp`` of the
  host do not exist inside; the hostname is ``sandbox``;
* the user program runs as a child of that PID 1 under a per-execution unused uid/gid
  (so RLIMIT_NPROC is enforced: it is not for root), with ``no_new_privs``, RLIMIT_AS /
  CPU / FSIZE / NPROC / NOFILE / CORE, an empty environment, a fresh anonymous session
  keyring (the caller's keys are neither visible nor writable; the uid's user keyrings
  are wiped) and a network namespace with no interfaces up (no route to anything,
  127.0.0.1 of the host included);
* when the program exits, PID 1 exits, and the kernel kills every process left
  in the PID namespace (double-forked or ``setsid`` survivors included). On a
  wall-clock timeout the host kills the launcher's process group and every task
  of the cgroups; PID 1 has ``PDEATHSIG=SIGKILL`` as a last resort.

Memory (``memory_mb``) bounds the whole run, all its processes together, in one of two ways
(``memory_mode`` in ``isolation_info``): ``cgroup-v1`` / ``cgroup-v2``, a per-run memory cgroup
of ``memory_mb + work_mb + 16`` MiB (the tmpfs files are charged to it too) with RLIMIT_AS =
``memory_mb`` per process; or, where no memory cgroup can be made, ``rlimit-split``: the run
may hold P tasks at once (P = min(max_procs, clamp(memory_mb // 64, 4, 8))) and each process
gets RLIMIT_AS = memory_mb // P, so P x RLIMIT_AS <= memory_mb (``memory_plan`` gives the
numbers). Measured on the project machine (root in a VM; 2026-12): cgroup v1, the pids
hierarchy is ours at its root (used); our memory cgroup is a job manager's sub-group and the
v2 hierarchy has only ``hugetlb``, so the mode there is ``rlimit-split``.

Verdicts (``call_function``): the tested code runs in its own process and hands back plain
data only; a judge process it cannot reach decides (``reward.sandbox_judge``).

Mode ``userns`` (not root, unprivileged user namespaces allowed, e.g. ``unshare -Urn``
works): the same namespaces and tmpfs root under a new user namespace that maps
only the caller's uid; the program keeps that uid but, not being uid 0 inside,
has no capabilities after ``execve``; RLIMIT_NPROC counts only the namespace's tasks
there. The caller's keys stay invisible to the program's fresh session keyring search,
but a key that grants its owner uid "view" can still be described by id.

Mode ``rlimits`` (no namespaces at all): only resource limits, a
new session killed as a group, a clean env and a temp cwd. No network
namespace exists there, so ``run_code`` refuses unless
``SandboxLimits(allow_network=True)`` (a warning is logged once).

What stays visible inside: the kernel's own ``/proc`` files (version, cpuinfo...), and the
Python installation's path (it is mounted at its own path; its shared library is found there).
Measured isolation: ``posttrain sandbox info``. Only the standard library is used.
"""

from __future__ import annotations

import json
import marshal
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

from posttrain.core.config import key
from reward import sandbox_cgroup as cgroup
from reward.sandbox_launcher import SANDBOX_UID_BASE  # noqa: F401 - re-exported (tests, tools)

_HERE = os.path.dirname(os.path.abspath(__file__))
_LAUNCHER = os.path.join(_HERE, "sandbox_launcher.py")
_JUDGE = os.path.join(_HERE, "sandbox_judge.py")

# ---------------------------------------------------------------- public API


@dataclass
class SandboxLimits:
    """Resource limits of one execution."""

    timeout_s: float = key(10.0, "wall clock; the whole process group is killed after it")
    cpu_s: float | None = key(None, "RLIMIT_CPU; default = timeout_s")
    memory_mb: int = key(512, "memory of the whole run, all its processes together (see memory_plan)")
    max_file_mb: int = key(16, "RLIMIT_FSIZE: largest file the program may write")
    max_procs: int = key(32, "processes/threads at once (pids cgroup and RLIMIT_NPROC of a fresh uid)")
    max_output_bytes: int = key(1_000_000, "stdout and stderr are each cut to this many bytes")
    allow_network: bool = key(False, "True only as an explicit opt-out where no netns can be made")
    work_mb: int = key(64, "size of the tmpfs that holds the work directory (namespaces mode)")


@dataclass
class SandboxResult:
    """What one execution did."""

    status: str  # "ok" | "error" | "timeout" | "memory" | "killed"
    exit_code: int | None
    stdout: str
    stderr: str
    seconds: float
    truncated: bool = False


STATUSES = ("ok", "error", "timeout", "memory", "killed")
RUN_TESTS = "@tests"  # call_function's func_name that means: each input is a test statement to run
_CG_PREFIX = cgroup.PREFIX
_SHM_MB = 16  # the /dev/shm tmpfs of the launcher
_MAX_RESULT = 64 << 20  # bytes of verdicts a judge may send back


def run_code(code: str, *, stdin: str | None = None, files: dict[str, str] | None = None,
             limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` as ``main.py`` in a fresh sandbox (``files`` are written next to it)."""
    return _execute(code, stdin=stdin, files=files or {}, limits=limits or SandboxLimits())[0]


def call_function(source: str, func_name: str, inputs: list, test_timeout_s: float | None = None, *,
                  limits: SandboxLimits | None = None) -> tuple[SandboxResult, list]:
    """Call ``func_name(x)`` of ``source`` for each x in ``inputs``, or run tests against it.

    Returns the execution result and one entry per input. For a function: the call's value as
    JSON, or ``{"error": "..."}`` for a call that raised or returned something that is not
    JSON data. With ``func_name=RUN_TESTS`` each input is a test statement (``assert f(2) ==
    4``) run with the source's names in scope; the entry is ``True`` when it completed, else
    ``{"error": "AssertionError: ..."}`` and the like; each test gets ``test_timeout_s``
    (default: the whole timeout). It takes three of the run's processes (``max_procs``): the
    judge, the tested code, one test at a time. If the run died (timeout, memory...) or, for a function, the
    tested code's process died, every entry is ``{"error": status}``.

    The verdicts cannot be forged by the tested code (``reward.sandbox_judge``): it runs in its
    own process and answers with plain data; comparisons and verdicts happen in the judge's
    processes, which it cannot reach; it never sees the tests. Output printed by the tested
    code (and the tests) is the result's stdout.
    """
    lim = limits or SandboxLimits()
    if lim.max_procs < 3:
        raise ValueError("call_function needs max_procs >= 3 (the judge, the tested code, one test)")
    job = {"mode": "tests" if func_name == RUN_TESTS else "call", "func": func_name, "inputs": list(inputs),
           "test_timeout_s": float(test_timeout_s if test_timeout_s is not None else lim.timeout_s)}
    with open(_JUDGE, encoding="utf-8") as f:
        judge = f.read()
    res, raw = _execute(judge, stdin=json.dumps(job), files={"solution.py": source}, limits=lim, want_result=True)
    result = None
    if res.status == "ok" and raw:
        try:
            result = json.loads(raw)
        except ValueError:
            result = None
    if isinstance(result, dict) and isinstance(result.get("died"), str):  # the tested code's process died
        res = _classify(0, result["died"], res.stdout.encode(), res.stderr.encode(), res.truncated, False,
                        False, res.seconds, lim)
        res.status = "error" if res.status == "ok" else res.status
        return res, [{"error": res.status} for _ in inputs]
    values = result.get("values") if isinstance(result, dict) else None
    if not isinstance(values, list) or len(values) != len(inputs):
        if res.status == "ok":  # the judge ran but gave no verdicts
            res = SandboxResult("error", res.exit_code, res.stdout, res.stderr + "\n[sandbox] no verdicts",
                                res.seconds, res.truncated)
        return res, [{"error": res.status} for _ in inputs]
    return res, values


class SandboxPool:
    """Runs many executions in parallel (threads, each driving one sandbox process)."""

    def __init__(self, workers: int | None = None, limits: SandboxLimits | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.workers = workers or os.cpu_count() or 1
        self.limits = limits or SandboxLimits()
        self._ex = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sandbox")

    def run_many(self, codes: list[str], stdins: list[str | None] | None = None) -> list[SandboxResult]:
        """``run_code`` for every code (with the matching stdin); results in input order."""
        stdins = stdins if stdins is not None else [None] * len(codes)
        if len(stdins) != len(codes):
            raise ValueError(f"run_many: {len(codes)} codes but {len(stdins)} stdins")
        futs = [self._ex.submit(run_code, c, stdin=s, limits=self.limits) for c, s in zip(codes, stdins)]
        return [f.result() for f in futs]

    def call_many(self, jobs: list[tuple]) -> list[tuple[SandboxResult, list]]:
        """``call_function(source, func_name, inputs[, test_timeout_s])`` for every job; results in input order."""
        futs = [self._ex.submit(call_function, *job, limits=self.limits) for job in jobs]
        return [f.result() for f in futs]

    def close(self) -> None:
        """Wait for running executions and stop the threads."""
        self._ex.shutdown(wait=True)

    def __enter__(self) -> SandboxPool:  # noqa: PYI034 - kept simple: the class is not subclassed
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def memory_plan(limits: SandboxLimits, memory_cgroup: bool | None = None) -> dict:
    """How ``limits.memory_mb`` bounds the run: ``mode``, ``per_process_mb`` (RLIMIT_AS), ``tasks``
    (pids cgroup / RLIMIT_NPROC), ``run_mb`` (the bound on all processes together).

    ``memory_cgroup`` None: whether this machine gives one (``isolation_info``).
    """
    if memory_cgroup is None:
        memory_cgroup = bool(isolation_info()["memory_cgroup"])
    if memory_cgroup:
        version = (isolation_info().get("cgroup_versions") or {}).get("memory") or 1
        return {"mode": f"cgroup-v{version}", "per_process_mb": limits.memory_mb, "tasks": limits.max_procs,
                "run_mb": limits.memory_mb + limits.work_mb + _SHM_MB}
    tasks = min(limits.max_procs, max(4, min(8, limits.memory_mb // 64)))
    per = max(1, limits.memory_mb // max(tasks, 1))
    return {"mode": "rlimit-split", "per_process_mb": per, "tasks": tasks, "run_mb": per * tasks}


# ---------------------------------------------------------------- isolation probe

_INFO: dict | None = None
_INFO_LOCK = threading.Lock()
_WARNED = False


def isolation_info() -> dict:
    """What this machine allows (measured once per process by a probe launcher).

    Keys: ``mode`` ("namespaces" | "userns" | "rlimits"), ``root``, ``netns``, ``pidns``, ``mountns``, ``userns``,
    ``cgroupns``, ``keyring`` (a fresh session keyring per run), ``pids_cgroup`` / ``memory_cgroup`` (the
    folder per-run groups go in, or None), ``cgroup_versions``, ``memory_mode`` ("cgroup-v1" | "cgroup-v2" |
    "rlimit-split", see ``memory_plan``), ``note``.
    """
    global _INFO
    with _INFO_LOCK:
        if _INFO is None:
            _INFO = _probe()
        return dict(_INFO)


def _probe() -> dict:
    import subprocess

    info: dict = {"root": os.geteuid() == 0, "netns": False, "pidns": False, "mountns": False, "userns": False,
                  "cgroupns": False, "keyring": False}
    try:
        p = subprocess.run([sys.executable, "-I", "-S", _LAUNCHER, "--probe"], check=False,
                           capture_output=True, text=True, timeout=30, env={})
        info.update({k: v == "1" for k, _, v in (w.partition("=") for w in p.stdout.split())})
    except Exception as e:  # noqa: BLE001 - any failure means: no namespaces
        info["probe_error"] = f"{type(e).__name__}: {e}"
    det = cgroup.detect()
    info["pids_cgroup"] = det["pids"]["base"] if det["pids"] else None
    info["memory_cgroup"] = det["memory"]["base"] if det["memory"] else None
    info["cgroup_versions"] = {c: (d["version"] if d else None) for c, d in det.items()}
    for base in {info["pids_cgroup"], info["memory_cgroup"]} - {None}:
        cgroup.remove_stale(base)
    full = info["root"] and info["netns"] and info["pidns"] and info["mountns"]
    # a user namespace as root would leave the program uid 0 (with capabilities) inside: not used
    userns = not info["root"] and info["userns"]
    info["mode"] = "namespaces" if full else "userns" if userns else "rlimits"
    info["memory_mode"] = f"cgroup-v{det['memory']['version']}" if det["memory"] else "rlimit-split"
    info["note"] = {
        "namespaces": "network, PID, mount, IPC, UTS, cgroup namespaces; per-run uid; chroot onto a private tmpfs",
        "userns": "unprivileged user namespace + network, PID, mount namespaces; chroot onto a private tmpfs",
        "rlimits": "no namespaces here: only rlimits + process-group kill; network is NOT isolated",
    }[info["mode"]] + ("; memory: one cgroup caps the run" if det["memory"] else
                       "; memory: no memory cgroup here, each process gets memory_mb / tasks of address space")
    return info


# ---------------------------------------------------------------- one execution (host side)

def _execute(code: str, *, stdin: str | None, files: dict[str, str], limits: SandboxLimits,
             want_result: bool = False) -> tuple[SandboxResult, bytes | None]:
    import subprocess

    global _WARNED
    info = isolation_info()
    if info["mode"] == "rlimits" and not limits.allow_network:
        if not _WARNED:
            _WARNED = True
            import logging

            logging.getLogger("posttrain.sandbox").warning(
                "sandbox: this machine cannot create a network namespace (%s); refusing to run code "
                "unless SandboxLimits(allow_network=True)", info.get("probe_error") or "unshare failed")
        return SandboxResult("error", None, "", "[sandbox] refused: no network namespace available on this "
                             "machine; set allow_network=True to run without network isolation", 0.0), None
    for name in files:
        if not name or name.startswith("/") or ".." in name.split("/") or name == "main.py":
            raise ValueError(f"sandbox: bad file name {name!r} (relative, no '..', not main.py)")
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="posttrain-sbx-")
    groups: list[str] = []
    proc = None
    fds: list[int] = []
    try:
        os.chmod(tmp, 0o700)
        groups, plan = _make_groups(limits)
        spec = {"mode": info["mode"], "code": code, "files": files, "limits": asdict(limits),
                "rl": {"as_mb": plan["per_process_mb"], "nproc": plan["tasks"]}, "cgroups": groups,
                "python": os.path.realpath(sys.executable), "prefix": os.path.realpath(sys.base_prefix),
                "stdin": stdin is not None}
        r_status, w_status = os.pipe()
        fds += [r_status, w_status]
        spec["status_fd"] = w_status
        pass_fds = [w_status]
        r_result = None
        if want_result:
            r_result, w_result = os.pipe()
            fds += [r_result, w_result]
            spec["result_fd"] = w_result
            pass_fds.append(w_result)
        with open(os.path.join(tmp, "spec.bin"), "wb") as f:
            marshal.dump(spec, f)  # marshal: the launcher loads it without importing json
        if stdin is not None:
            with open(os.path.join(tmp, "stdin.txt"), "w") as f:
                f.write(stdin)
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", _LAUNCHER, "--launch", tmp],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=pass_fds, start_new_session=True, env={}, cwd=tmp)
        for fd in pass_fds:  # only the launcher holds the write ends now: EOF when it and its children end
            os.close(fd)
            fds.remove(fd)
        out, err, result, trunc, timed_out = _drive(proc, limits, t0, groups, r_result)
        status_line = _read_all(r_status).decode(errors="replace").strip()
        seconds = time.monotonic() - t0
        res = _classify(proc.returncode, status_line, out, err, trunc, timed_out, cgroup.oom_killed(groups),
                        seconds, limits)
        return res, result
    finally:
        if proc is not None and proc.poll() is None:
            _kill(proc, groups)
            proc.wait()
        for fd in fds:
            os.close(fd)
        cgroup.remove(groups)
        shutil.rmtree(tmp, ignore_errors=True)


def _make_groups(limits: SandboxLimits) -> tuple[list[str], dict]:
    """The run's cgroups and its memory plan (``rlimit-split`` when no memory group could be made)."""
    info = isolation_info()
    det = {"pids": None, "memory": None}
    for ctrl in det:
        if info.get(f"{ctrl}_cgroup"):
            det[ctrl] = {"version": info["cgroup_versions"][ctrl], "base": info[f"{ctrl}_cgroup"]}
    name = f"{_CG_PREFIX}{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}"
    if det["memory"]:
        plan = memory_plan(limits, memory_cgroup=True)
        try:
            return cgroup.make(det, name, plan["tasks"] + 2, plan["run_mb"] * 1024 * 1024), plan
        except OSError:
            pass
    plan = memory_plan(limits, memory_cgroup=False)
    try:
        return cgroup.make(det, name, plan["tasks"] + 2, None), plan  # + launcher and PID 1
    except OSError:
        return [], plan


def _drive(proc, limits: SandboxLimits, t0: float, groups: list[str], r_result: int | None
           ) -> tuple[bytes, bytes, bytes | None, bool, bool]:
    """Collect output and the result pipe (keeping at most the limits) until exit or the deadline."""
    import selectors

    cap = limits.max_output_bytes
    fo, fe = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {fo: bytearray(), fe: bytearray()}
    caps = {fo: cap, fe: cap}
    if r_result is not None:
        bufs[r_result] = bytearray()
        caps[r_result] = _MAX_RESULT
    trunc = result_trunc = False
    timed_out = False
    deadline = t0 + limits.timeout_s
    exited_at = None
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 1.0:
                break  # the launcher is gone but something still holds the pipes: kill below
            for k, _ in sel.select(timeout=min(0.2, deadline - now)):
                try:
                    chunk = os.read(k.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(k.fd)
                    continue
                buf = bufs[k.fd]
                room = caps[k.fd] - len(buf)
                if len(chunk) > room:
                    if k.fd == r_result:
                        result_trunc = True
                    else:
                        trunc = True
                    chunk = chunk[:max(room, 0)]
                buf += chunk
    finally:
        still_open = bool(sel.get_map())
        sel.close()
    if proc.poll() is None or timed_out or still_open:
        _kill(proc, groups)
    try:
        proc.wait(timeout=10)
    except Exception:  # noqa: BLE001, S110 - a launcher that ignores SIGKILL is not possible; be safe anyway
        pass
    result = None if r_result is None or result_trunc else bytes(bufs[r_result])
    out, err = bytes(bufs[fo]), bytes(bufs[fe])
    proc.stdout.close()
    proc.stderr.close()
    return out, err, result, trunc, timed_out


def _kill(proc, groups: list[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    cgroup.kill(groups)


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 4096):
            data += chunk
    except BlockingIOError:
        pass
    return data


def _classify(rc: int | None, status_line: str, out: bytes, err: bytes, trunc: bool, timed_out: bool,
              oom: bool, seconds: float, limits: SandboxLimits) -> SandboxResult:
    stdout = out.decode("utf-8", "replace")
    stderr = err.decode("utf-8", "replace")
    exit_code: int | None = None
    kind, _, num = status_line.partition(" ")
    if timed_out:
        status = "timeout"
    elif kind == "exit":
        exit_code = int(num)
        status = "ok" if exit_code == 0 else "error"
    elif kind == "signal":
        sig = int(num)
        exit_code = -sig
        status = "timeout" if sig == signal.SIGXCPU else "killed"
    elif rc is not None and rc >= 0 and kind == "":
        # rlimits mode: the launcher became the program, its own exit code is the program's
        exit_code = rc
        status = "ok" if rc == 0 else "error"
    elif rc is not None and rc < 0:
        exit_code = rc
        status = "timeout" if -rc == signal.SIGXCPU else "killed"
    else:
        status = "error"
        stderr += "\n[sandbox] the launcher failed before running the program"
    if status in ("error", "killed") and (oom or "MemoryError" in stderr[-2000:]):
        status = "memory"
    if status == "killed" and exit_code == -signal.SIGKILL and limits.cpu_s is None and seconds >= limits.timeout_s:
        status = "timeout"
    return SandboxResult(status, exit_code, stdout, stderr, round(seconds, 4), trunc)


# ---------------------------------------------------------------- CLI

def add_cli(sub) -> None:
    """Add ``posttrain sandbox run FILE.py`` and ``posttrain sandbox info``."""
    p = sub.add_parser("sandbox", help="run Python code in the sandbox")
    s = p.add_subparsers(dest="sandbox_cmd", required=True)
    r = s.add_parser("run", help="run FILE.py sandboxed; print one JSON object")
    r.add_argument("file")
    r.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds")
    r.add_argument("--memory-mb", type=int, default=512, help="memory of the whole run (all its processes)")
    r.add_argument("--stdin", default=None, help="file whose content is the program's stdin")
    r.add_argument("--allow-network", action="store_true",
                   help="run even where no network namespace can be made")
    r.set_defaults(fn=_cmd_run)
    i = s.add_parser("info", help="print the isolation this machine allows")
    i.set_defaults(fn=lambda a: print(json.dumps(isolation_info(), indent=2)) or 0)


def _cmd_run(a) -> int:
    with open(a.file, encoding="utf-8") as f:
        code = f.read()
    stdin = None
    if a.stdin:
        with open(a.stdin, encoding="utf-8") as f:
            stdin = f.read()
    res = run_code(code, stdin=stdin, limits=SandboxLimits(timeout_s=a.timeout, memory_mb=a.memory_mb,
                                                           allow_network=a.allow_network))
    print(json.dumps(asdict(res), ensure_ascii=False))
    return 0 if res.status == "ok" else 1
