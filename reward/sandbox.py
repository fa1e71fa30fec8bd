"""Run untrusted (model-written) Python code in a contained, throw-away process.

Input: source code (plus optional stdin text and extra files), limits. Output: a
``SandboxResult`` with status ``ok`` | ``error`` | ``timeout`` | ``memory`` | ``killed``,
the exit code, truncated stdout/stderr, wall seconds. ``call_function`` loads a
source and calls one function on a list of JSON inputs in one process;
``SandboxPool`` runs many executions in parallel (threads driving processes).
CLI: ``posttrain sandbox run FILE.py [--timeout S] [--memory-mb M]`` prints one JSON
object; ``posttrain sandbox info`` prints what isolation this machine allows.

How one execution is contained (mode ``namespaces``, used when we are root and
``unshare`` works, as measured on the project machine):

* a launcher process (``sandbox_launcher.py`` run with ``python -I -S``, clean
  empty environment, own session) joins a fresh pids cgroup (``pids.max`` =
  ``max_procs``) and memory cgroup when we sit at the root of those cgroup-v1
  hierarchies and may write there, then ``unshare``s new mount, PID, network,
  IPC and UTS namespaces;
* the namespace's PID 1 builds a new root on a size-limited tmpfs holding only
  read-only, nosuid bind mounts of ``/usr`` (and the ``/bin``, ``/lib*`` links)
  and the Python installation, a private ``/proc``, ``/dev/{null,zero,urandom}``
  and the work directory ``/sandbox``; it ``chroot``s there. Project files,
  ``/root``, ``/home``, ``/tmp`` of the host do not exist inside;
* the user program runs as a child of that PID 1 under a per-execution unused
  uid/gid (so RLIMIT_NPROC is enforced: it is not for root), with ``no_new_privs``,
  RLIMIT_AS / CPU / FSIZE / NPROC / NOFILE / CORE, an empty environment, and a
  network namespace with no interfaces up (no route to anything, 127.0.0.1 of
  the host included);
* when the program exits, PID 1 exits, and the kernel kills every process left
  in the PID namespace (double-forked or ``setsid`` survivors included). On a
  wall-clock timeout the host kills the launcher's process group and every task
  of the cgroup; PID 1 has ``PDEATHSIG=SIGKILL`` as a last resort.

Measured on the project machine (root in a VM, cgroup v1; 2026-11-22): ``unshare``
of net/pid/mount/user namespaces works; the pids hierarchy is ours at its root
(used); our memory cgroup is a job manager's sub-group, so no memory cgroup is
made and the memory bound is ``memory_mb`` per process x ``max_procs`` processes.
RLIMIT_NPROC alone would not hold (root is exempt), hence the fresh uid.

Mode ``userns`` (not root, unprivileged user namespaces allowed, e.g. ``unshare -Urn``
works): the same namespaces and tmpfs root under a new user namespace that maps
only the caller's uid; the program keeps that uid but, not being uid 0 inside,
has no capabilities after ``execve``; RLIMIT_NPROC counts only the namespace's
tasks there. Measured here as uid 65534: works.

Mode ``rlimits`` (no namespaces at all): only resource limits, a
new session killed as a group, a clean env and a temp cwd. No network
namespace exists there, so ``run_code`` refuses unless
``SandboxLimits(allow_network=True)`` (a warning is logged once).

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
from reward.sandbox_launcher import SANDBOX_UID_BASE  # noqa: F401 - re-exported (tests, tools)

_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")

# ---------------------------------------------------------------- public API


@dataclass
class SandboxLimits:
    """Resource limits of one execution."""

    timeout_s: float = key(10.0, "wall clock; the whole process group is killed after it")
    cpu_s: float | None = key(None, "RLIMIT_CPU; default = timeout_s")
    memory_mb: int = key(512, "RLIMIT_AS of each process (and the memory cgroup limit, when writable)")
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
_CGROUP_ROOT = "/sys/fs/cgroup"
_CG_PREFIX = "posttrain-sbx-"


def run_code(code: str, *, stdin: str | None = None, files: dict[str, str] | None = None,
             limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` as ``main.py`` in a fresh sandbox (``files`` are written next to it)."""
    return _execute(code, stdin=stdin, files=files or {}, limits=limits or SandboxLimits())


def call_function(source: str, func_name: str, inputs: list, *, limits: SandboxLimits | None = None
                  ) -> tuple[SandboxResult, list]:
    """Load ``source`` in ONE sandboxed process and call ``func_name(x)`` for each x in ``inputs``.

    Returns the execution result and one entry per input: the call's JSON value, or
    ``{"error": "..."}`` for a call that raised (or returned something not JSON-able).
    If the process died (timeout/memory/...), every entry is ``{"error": status}``.
    Output printed by the source is captured away from the result channel; results
    are framed by a random marker and the driver leaves with ``os._exit`` so atexit
    hooks or threads of the source cannot append to them. (A program that inspects
    its own interpreter can still forge results: treat them as evidence, not proof.)
    """
    nonce = secrets.token_hex(16)
    driver = _DRIVER.replace("@NONCE@", nonce).replace("@FUNC@", json.dumps(func_name))
    res = _execute(driver, stdin=None, limits=limits or SandboxLimits(),
                   files={"solution.py": source, "inputs.json": json.dumps(inputs)})
    marker = f"@@RESULT-{nonce}@@"
    out, _, tail = res.stdout.rpartition(marker)
    values: list | None = None
    if _ and res.status == "ok":
        try:
            values = json.loads(tail.strip())
        except json.JSONDecodeError:
            values = None
    if not isinstance(values, list) or len(values) != len(inputs):
        status = res.status if res.status != "ok" else "error"
        if res.status == "ok":  # ran but never reached the result line (e.g. exited early)
            res = SandboxResult("error", res.exit_code, res.stdout, res.stderr + "\n[sandbox] no result line",
                                res.seconds, res.truncated)
        return res, [{"error": status} for _ in inputs]
    res.stdout = out
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

    def call_many(self, jobs: list[tuple[str, str, list]]) -> list[tuple[SandboxResult, list]]:
        """``call_function(source, func_name, inputs)`` for every job; results in input order."""
        futs = [self._ex.submit(call_function, s, fn, xs, limits=self.limits) for s, fn, xs in jobs]
        return [f.result() for f in futs]

    def close(self) -> None:
        """Wait for running executions and stop the threads."""
        self._ex.shutdown(wait=True)

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The program call_function runs: it imports the solution, calls the function on each
# input with the solution's prints diverted, and writes the framed result last.
_DRIVER = r'''
import io, json, os, sys
def _main():
    real_out = os.dup(1)
    inputs = json.load(open("inputs.json"))
    src = open("solution.py").read()
    out = []
    sink = io.StringIO()
    sys.stdout = sink
    try:
        g = {"__name__": "solution"}
        exec(compile(src, "solution.py", "exec"), g)
        fn = g.get(@FUNC@)
        load_err = None if callable(fn) else "function %s not defined" % @FUNC@
    except BaseException as e:
        load_err = "%s: %s" % (type(e).__name__, e)
    for x in inputs:
        if load_err:
            out.append({"error": load_err}); continue
        try:
            v = fn(x)
            json.dumps(v)
            out.append(v)
        except BaseException as e:
            out.append({"error": "%s: %s" % (type(e).__name__, str(e)[:200])})
    sys.stdout = sys.__stdout__
    data = sink.getvalue()[-20000:] + "\n@@RESULT-@NONCE@@@" + json.dumps(out) + "\n"
    b = data.encode("utf-8", "replace")
    while b:
        b = b[os.write(real_out, b):]
    os._exit(0)
_main()
'''


# ---------------------------------------------------------------- isolation probe

_INFO: dict | None = None
_INFO_LOCK = threading.Lock()
_WARNED = False


def isolation_info() -> dict:
    """What this machine allows (measured once per process by a probe launcher).

    Keys: ``mode`` ("namespaces" | "userns" | "rlimits"), ``root``, ``netns``, ``pidns``, ``mountns``, ``userns``,
    ``pids_cgroup``, ``memory_cgroup`` (a writable parent folder or None), ``note``.
    """
    global _INFO
    with _INFO_LOCK:
        if _INFO is None:
            _INFO = _probe()
        return dict(_INFO)


def _probe() -> dict:
    import subprocess

    info = {"root": os.geteuid() == 0, "netns": False, "pidns": False, "mountns": False, "userns": False}
    try:
        p = subprocess.run([sys.executable, "-I", "-S", _LAUNCHER, "--probe"],
                           capture_output=True, text=True, timeout=30, env={})
        info.update({k: v == "1" for k, _, v in (w.partition("=") for w in p.stdout.split())})
    except Exception as e:  # noqa: BLE001 - any failure means: no namespaces
        info["probe_error"] = f"{type(e).__name__}: {e}"
    info["pids_cgroup"] = _writable_cgroup("pids")
    info["memory_cgroup"] = _writable_cgroup("memory")
    for base in (info["pids_cgroup"], info["memory_cgroup"]):
        if base:
            _remove_stale_cgroups(base)
    full = info["root"] and info["netns"] and info["pidns"] and info["mountns"]
    # a user namespace as root would leave the program uid 0 (with capabilities) inside: not used
    userns = not info["root"] and info["userns"]
    info["mode"] = "namespaces" if full else "userns" if userns else "rlimits"
    info["note"] = {
        "namespaces": "network, PID and mount namespaces; per-run uid; chroot onto a private tmpfs",
        "userns": "unprivileged user namespace + network, PID and mount namespaces; chroot onto a private tmpfs",
        "rlimits": "no namespaces here: only rlimits + process-group kill; network is NOT isolated",
    }[info["mode"]]
    return info


def _own_cgroup(controller: str) -> str | None:
    try:
        for line in open("/proc/self/cgroup"):
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            if controller in ctrls.split(","):
                return path
    except OSError:
        return None
    return None


def _writable_cgroup(controller: str) -> str | None:
    """The root folder of a cgroup-v1 ``controller`` when we sit at that root and may create children.

    A cgroup below the root belongs to whoever started us (a container or job manager): we do not
    nest our per-run groups in it, since one left behind by a crash would block its removal.
    """
    rel = _own_cgroup(controller)
    if rel != "/":
        return None
    base = os.path.join(_CGROUP_ROOT, controller)
    probe = os.path.join(base, f"{_CG_PREFIX}probe-{os.getpid()}")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
        return base
    except OSError:
        return None


# ---------------------------------------------------------------- one execution (host side)

def _execute(code: str, *, stdin: str | None, files: dict[str, str], limits: SandboxLimits) -> SandboxResult:
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
                             "machine; set allow_network=True to run without network isolation", 0.0)
    for name in files:
        if not name or name.startswith("/") or ".." in name.split("/") or name == "main.py":
            raise ValueError(f"sandbox: bad file name {name!r} (relative, no '..', not main.py)")
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="posttrain-sbx-")
    cgroups: list[str] = []
    proc = None
    r_status = w_status = -1
    try:
        os.chmod(tmp, 0o700)
        spec = {"mode": info["mode"], "code": code, "files": files, "limits": asdict(limits),
                "python": os.path.realpath(sys.executable), "prefix": os.path.realpath(sys.base_prefix),
                "stdin": stdin is not None}
        cgroups = _make_cgroups(info, limits)
        spec["cgroups"] = cgroups
        r_status, w_status = os.pipe()
        spec["status_fd"] = w_status
        with open(os.path.join(tmp, "spec.bin"), "wb") as f:
            marshal.dump(spec, f)  # marshal: the launcher loads it without importing json
        if stdin is not None:
            with open(os.path.join(tmp, "stdin.txt"), "w") as f:
                f.write(stdin)
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", _LAUNCHER, "--launch", tmp],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=[w_status], start_new_session=True, env={}, cwd=tmp)
        os.close(w_status)
        w_status = -1
        out, err, trunc, timed_out = _drive(proc, limits, t0, cgroups)
        status_line = _read_all(r_status).decode(errors="replace").strip()
        seconds = time.monotonic() - t0
        oom = any(_oom_happened(c) for c in cgroups)
        return _classify(proc.returncode, status_line, out, err, trunc, timed_out, oom, seconds, limits)
    finally:
        if proc is not None and proc.poll() is None:
            _kill(proc, cgroups)
            proc.wait()
        for fd in (r_status, w_status):
            if fd >= 0:
                os.close(fd)
        _remove_cgroups(cgroups)
        shutil.rmtree(tmp, ignore_errors=True)


def _drive(proc, limits: SandboxLimits, t0: float, cgroups: list[str]) -> tuple[bytes, bytes, bool, bool]:
    """Collect output (keeping at most the limit, draining the rest) until exit or the deadline."""
    import selectors

    cap = limits.max_output_bytes
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    trunc = False
    timed_out = False
    deadline = t0 + limits.timeout_s
    exited_at = None
    sel = selectors.DefaultSelector()
    for f in bufs:
        os.set_blocking(f.fileno(), False)
        sel.register(f, selectors.EVENT_READ)
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
            for key, _ in sel.select(timeout=min(0.2, deadline - now)):
                try:
                    chunk = os.read(key.fileobj.fileno(), 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.fileobj]
                room = cap - len(buf)
                if len(chunk) > room:
                    trunc = True
                    chunk = chunk[:max(room, 0)]
                buf += chunk
    finally:
        still_open = bool(sel.get_map())
        sel.close()
    if proc.poll() is None or timed_out or still_open:
        _kill(proc, cgroups)
    try:
        proc.wait(timeout=10)
    except Exception:  # noqa: BLE001 - a launcher that ignores SIGKILL is not possible; be safe anyway
        pass
    for f in bufs:
        f.close()
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), trunc, timed_out


def _kill(proc, cgroups: list[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for cg in cgroups:
        _kill_cgroup(cg)


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


# ---------------------------------------------------------------- cgroups (host side)

def _make_cgroups(info: dict, limits: SandboxLimits) -> list[str]:
    made = []
    name = f"{_CG_PREFIX}{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}"
    try:
        if info.get("pids_cgroup"):
            p = os.path.join(info["pids_cgroup"], name)
            os.mkdir(p)
            made.append(p)
            _write(os.path.join(p, "pids.max"), str(limits.max_procs + 2))  # + launcher and PID 1
        if info.get("memory_cgroup"):
            p = os.path.join(info["memory_cgroup"], name)
            os.mkdir(p)
            made.append(p)
            # processes share one budget: a bomb of max_procs children cannot take max_procs x memory_mb
            total = (2 * limits.memory_mb + limits.work_mb + 64) * 1024 * 1024
            _write(os.path.join(p, "memory.limit_in_bytes"), str(total))
            try:
                _write(os.path.join(p, "memory.memsw.limit_in_bytes"), str(total))
            except OSError:
                pass  # no swap accounting: fine, there is no swap here
    except OSError:
        _remove_cgroups(made)
        return []
    return made


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _kill_cgroup(cg: str) -> None:
    for _ in range(50):
        try:
            pids = [int(x) for x in open(os.path.join(cg, "cgroup.procs")).read().split()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _oom_happened(cg: str) -> bool:
    try:
        for line in open(os.path.join(cg, "memory.oom_control")):
            if line.startswith("oom_kill ") and int(line.split()[1]) > 0:
                return True
    except (OSError, ValueError):
        return False
    return False


def _remove_stale_cgroups(base: str) -> None:
    """Remove cgroups left by a host process that died mid-execution (its pid is gone)."""
    for name in os.listdir(base):
        if not name.startswith(_CG_PREFIX):
            continue
        owner = name[len(_CG_PREFIX):].split("-")[0]
        if owner.isdigit() and int(owner) != os.getpid() and not os.path.exists(f"/proc/{owner}"):
            _remove_cgroups([os.path.join(base, name)])


def _remove_cgroups(cgroups: list[str]) -> None:
    for cg in cgroups:
        for _ in range(100):
            try:
                os.rmdir(cg)
                break
            except FileNotFoundError:
                break
            except OSError:  # still has tasks (they are being reaped): kill and retry
                _kill_cgroup(cg)
                time.sleep(0.01)


# ---------------------------------------------------------------- CLI

def add_cli(sub) -> None:
    """Add ``posttrain sandbox run FILE.py`` and ``posttrain sandbox info``."""
    p = sub.add_parser("sandbox", help="run Python code in the sandbox")
    s = p.add_subparsers(dest="sandbox_cmd", required=True)
    r = s.add_parser("run", help="run FILE.py sandboxed; print one JSON object")
    r.add_argument("file")
    r.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds")
    r.add_argument("--memory-mb", type=int, default=512, help="address-space limit")
    r.add_argument("--stdin", default=None, help="file whose content is the program's stdin")
    r.add_argument("--allow-network", action="store_true",
                   help="run even where no network namespace can be made")
    r.set_defaults(fn=_cmd_run)
    i = s.add_parser("info", help="print the isolation this machine allows")
    i.set_defaults(fn=lambda a: print(json.dumps(isolation_info(), indent=2)) or 0)


def _cmd_run(a) -> int:
    with open(a.file, encoding="utf-8") as f:
        code = f.read()
    stdin = open(a.stdin, encoding="utf-8").read() if a.stdin else None
    res = run_code(code, stdin=stdin, limits=SandboxLimits(timeout_s=a.timeout, memory_mb=a.memory_mb,
                                                           allow_network=a.allow_network))
    print(json.dumps(asdict(res), ensure_ascii=False))
    return 0 if res.status == "ok" else 1
