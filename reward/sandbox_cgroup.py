"""Per-run cgroups of the sandbox, host side (standard library only).

Input: this machine's cgroup mounts and our own cgroups (``/proc/self/mountinfo``,
``/proc/self/cgroup``), and one run's process and memory limits. Output: which controllers
can get per-run groups and where (``detect``), the groups of one run (``make``: the launcher
writes its pid into each), whether the kernel killed something there for memory
(``oom_killed``), and their end (``kill``, ``remove``, ``remove_stale``).

Per-run groups are nested only where we sit at the ROOT of a hierarchy: a group below the
root belongs to whoever started us (a container runtime, a job manager), and a group of ours
left there by a crash would block its removal; we do not move ourselves either. So:

* cgroup v1: ``/sys/fs/cgroup/pids`` and ``/sys/fs/cgroup/memory`` when ``/proc/self/cgroup``
  puts us at ``/`` of that controller;
* cgroup v2 (the unified hierarchy, at ``/sys/fs/cgroup`` or ``/sys/fs/cgroup/unified``) when
  we are at its root ``0::/`` and its ``cgroup.controllers`` lists ``pids`` / ``memory``; the
  controller is enabled in the root's ``cgroup.subtree_control`` if it is not yet.

A v2 group gets ``memory.max``, ``memory.swap.max = 0`` and ``memory.oom.group = 1`` (an OOM
kill takes the whole run), a v1 group ``memory.limit_in_bytes`` (and ``memsw`` when swap is
accounted); ``pids.max`` in either.
"""

from __future__ import annotations

import os
import signal
import time

PREFIX = "posttrain-sbx-"
ROOT = "/sys/fs/cgroup"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def own_cgroups(self_cgroup: str = "/proc/self/cgroup") -> dict[str, str]:
    """Our cgroup path per v1 controller, and ``""`` -> our v2 path."""
    out: dict[str, str] = {}
    try:
        for line in _read(self_cgroup).splitlines():
            hid, ctrls, path = line.split(":", 2)
            if hid == "0" and ctrls == "":
                out[""] = path
            for c in ctrls.split(","):
                if c:
                    out[c] = path
    except (OSError, ValueError):
        pass
    return out


def v2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the unified (v2) hierarchy is mounted with its full tree visible, or None."""
    try:
        for line in _read(mountinfo).splitlines():
            left, _, right = line.partition(" - ")
            f = left.split()
            if right.split()[:1] == ["cgroup2"] and len(f) >= 5 and f[3] == "/":
                return f[4]
    except OSError:
        return None
    return None


def _can_nest(base: str) -> bool:
    probe = os.path.join(base, f"{PREFIX}probe-{os.getpid()}")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
        return True
    except OSError:
        return False


def detect(root: str = ROOT, self_cgroup: str = "/proc/self/cgroup",
           mountinfo: str = "/proc/self/mountinfo") -> dict[str, dict | None]:
    """``{"pids": {"version": 1|2, "base": folder} | None, "memory": ...}``: where per-run groups go."""
    own = own_cgroups(self_cgroup)
    out: dict[str, dict | None] = {"pids": None, "memory": None}
    for ctrl in out:
        base = os.path.join(root, ctrl)
        if own.get(ctrl) == "/" and _can_nest(base):
            out[ctrl] = {"version": 1, "base": base}
    v2 = v2_mount(mountinfo)
    if v2 and own.get("") == "/":
        try:
            available = _read(os.path.join(v2, "cgroup.controllers")).split()
        except OSError:
            available = []
        for ctrl in ("pids", "memory"):
            if out[ctrl] is not None or ctrl not in available:
                continue
            sub = os.path.join(v2, "cgroup.subtree_control")
            try:
                if ctrl not in _read(sub).split():
                    _write(sub, f"+{ctrl}")
                if ctrl in _read(sub).split() and _can_nest(v2):
                    out[ctrl] = {"version": 2, "base": v2}
            except OSError:
                continue
    return out


def make(det: dict, name: str, nproc: int, memory_bytes: int | None) -> list[str]:
    """Create the groups of one run (``memory_bytes`` None: no memory group); raises OSError (nothing left)."""
    want = [c for c in ("pids", "memory") if det.get(c) and (c == "pids" or memory_bytes is not None)]
    by_base: dict[str, list[str]] = {}
    for c in want:
        by_base.setdefault(det[c]["base"], []).append(c)
    made: list[str] = []
    try:
        for base, ctrls in by_base.items():
            p = os.path.join(base, name)
            os.mkdir(p)
            made.append(p)
            v2 = det[ctrls[0]]["version"] == 2
            if "pids" in ctrls:
                _write(os.path.join(p, "pids.max"), str(nproc))
            if "memory" in ctrls:
                assert memory_bytes is not None
                if v2:
                    _write(os.path.join(p, "memory.max"), str(memory_bytes))
                    for fname, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                        if os.path.exists(os.path.join(p, fname)):
                            _write(os.path.join(p, fname), value)
                else:
                    _write(os.path.join(p, "memory.limit_in_bytes"), str(memory_bytes))
                    try:
                        _write(os.path.join(p, "memory.memsw.limit_in_bytes"), str(memory_bytes))
                    except OSError:
                        pass  # no swap accounting: there is no swap to escape to either
    except BaseException:
        remove(made)
        raise
    return made


def has_memory(groups: list[str]) -> bool:
    """Whether one of ``groups`` limits memory."""
    return any(os.path.exists(os.path.join(g, f)) for g in groups for f in ("memory.max", "memory.limit_in_bytes"))


def oom_killed(groups: list[str]) -> bool:
    """Whether the kernel's OOM killer acted inside one of ``groups``."""
    for g in groups:
        for fname in ("memory.events", "memory.oom_control"):
            try:
                for line in _read(os.path.join(g, fname)).splitlines():
                    k, _, v = line.partition(" ")
                    if k == "oom_kill" and int(v) > 0:
                        return True
            except (OSError, ValueError):
                continue
    return False


def kill(groups: list[str]) -> None:
    """SIGKILL every task of ``groups`` (``cgroup.kill`` where v2 has it)."""
    for g in groups:
        try:
            _write(os.path.join(g, "cgroup.kill"), "1")
        except OSError:
            pass
        for _ in range(50):
            try:
                pids = [int(x) for x in _read(os.path.join(g, "cgroup.procs")).split()]
            except OSError:
                break
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.01)


def remove(groups: list[str]) -> None:
    """Remove ``groups`` (killing what is still inside)."""
    for g in groups:
        for _ in range(100):
            try:
                os.rmdir(g)
                break
            except FileNotFoundError:
                break
            except OSError:  # still has tasks (being reaped): kill and retry
                kill([g])
                time.sleep(0.01)


def remove_stale(base: str) -> None:
    """Remove groups left by a host process that died mid-execution (its pid is gone)."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        if not name.startswith(PREFIX):
            continue
        owner = name[len(PREFIX):].split("-")[0]
        if owner.isdigit() and int(owner) != os.getpid() and not os.path.exists(f"/proc/{owner}"):
            remove([os.path.join(base, name)])
