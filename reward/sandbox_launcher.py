"""The process that sets up one sandbox execution (run as a script by ``reward.sandbox``).

Input: ``python -I -S -B sandbox_launcher.py --launch DIR`` where ``DIR/spec.bin`` is a
``marshal``-ed dict (code, files, limits, interpreter, cgroups, status fd), or
``--probe``. Output: the program's stdout/stderr pass through; one status line
(``exit N`` / ``signal N``) is written to the inherited status fd.

It runs once per execution, so it imports only builtin-speed modules (os, sys,
marshal, ctypes, resource): ``json``/``re``/``dataclasses`` would double the
start-up cost. The steps and why they are there are described in
``data_synthesis/sandbox.py``.
"""

import marshal
import os
import sys

SANDBOX_UID_BASE = 1_200_000  # sandbox uids are BASE + launcher pid: unused by any real account
SIGKILL = 9

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWPID, _CLONE_NEWNET, _CLONE_NEWUSER = 0x20000000, 0x40000000, 0x10000000
_ALL_NS = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        import ctypes

        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(libc, src, dst, fstype, flags, data=None) -> None:
    def enc(s):
        return s.encode() if s is not None else None

    _check(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), f"mount {src} -> {dst}")


def _bind_ro(libc, src: str, root: str) -> None:
    dst = os.path.join(root, src.lstrip("/"))
    os.makedirs(dst, exist_ok=True)
    _mount(libc, src, dst, None, _MS_BIND | _MS_REC)
    _mount(libc, None, dst, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)


def _enter_userns(libc) -> None:
    """New user namespace (plus the others) mapping only our own uid/gid to themselves."""
    uid, gid = os.getuid(), os.getgid()
    _check(libc.unshare(_ALL_NS | _CLONE_NEWUSER), "unshare")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def probe_main() -> None:
    """Try the namespaces in throw-away children; print ``netns=1 pidns=1 mountns=1 userns=1``-style words."""
    res = []
    for key, flag in (("netns", _CLONE_NEWNET), ("pidns", _CLONE_NEWPID), ("mountns", _CLONE_NEWNS),
                      ("userns", None)):
        pid = os.fork()
        if pid == 0:
            try:
                libc = _libc()
                if flag is None:  # the unprivileged path: all namespaces under a new user namespace
                    _enter_userns(libc)
                    _mount(libc, "tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m")
                else:
                    _check(libc.unshare(flag), "unshare")
                os._exit(0)
            except BaseException:  # noqa: BLE001
                os._exit(1)
        _, st = os.waitpid(pid, 0)
        res.append(f"{key}={int(os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0)}")
    print(" ".join(res))


def _set_rlimits(lim: dict, nproc: int | None = None) -> None:
    import resource

    mb = 1024 * 1024
    cpu = lim["cpu_s"] if lim["cpu_s"] is not None else lim["timeout_s"]
    cpu = max(1, int(cpu + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # soft: SIGXCPU, hard: SIGKILL a second later
    resource.setrlimit(resource.RLIMIT_AS, (lim["memory_mb"] * mb, lim["memory_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["max_file_mb"] * mb, lim["max_file_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    # counted per real uid (threads too), never enforced for root: exact with a fresh uid; for a
    # shared uid the caller passes what that uid already runs plus max_procs
    n = lim["max_procs"] if nproc is None else nproc
    resource.setrlimit(resource.RLIMIT_NPROC, (n, n))


def _write_work_files(work: str, spec: dict, uid) -> None:
    for name, text in [("main.py", spec["code"])] + list(spec["files"].items()):
        path = os.path.join(work, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    if uid is not None:
        for dirpath, dirnames, filenames in os.walk(work):
            for n in [dirpath] + [os.path.join(dirpath, x) for x in dirnames + filenames]:
                os.chown(n, uid, uid)


def _world_usable(path: str) -> bool:
    """True when every folder on the way to ``path`` is searchable and it is executable by others."""
    parts = os.path.realpath(path).split("/")
    for i in range(2, len(parts) + 1):
        try:
            mode = os.stat("/".join(parts[:i]) or "/").st_mode
        except OSError:
            return False
        if not mode & 0o001:
            return False
    return True


def _tasks_of_uid(uid: int) -> int:
    """How many tasks (threads included) the real uid runs now: what RLIMIT_NPROC counts."""
    n = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                st = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(st.get("Uid", "-1").split()[0]) == uid:
            n += int(st.get("Threads", "1"))
    return n


def _drop_privileges(uid: int, libc=None) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if libc is not None:
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def launch_main(tmp: str) -> None:
    """Set up and run one execution (see the module docstring of ``reward.sandbox``)."""
    with open(os.path.join(tmp, "spec.bin"), "rb") as f:
        spec = marshal.load(f)
    lim = spec["limits"]
    argv = [spec["python"], "-I", "-S", "-B", "main.py"]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
           "HOME": "/sandbox", "TMPDIR": "/tmp"}
    stdin_path = os.path.join(tmp, "stdin.txt") if spec["stdin"] else "/dev/null"
    status_fd = spec["status_fd"]
    for cg in spec["cgroups"]:
        with open(os.path.join(cg, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    if spec["mode"] == "rlimits":
        _launch_rlimits_only(tmp, spec, argv, env, stdin_path, status_fd)
    libc = _libc()
    if spec["mode"] == "userns":
        # unprivileged: the program keeps our uid (the only one mapped) and, not being uid 0 in
        # the namespace, loses every capability at execve
        uid = None
        _enter_userns(libc)
    else:
        uid = SANDBOX_UID_BASE + os.getpid()
        _check(libc.unshare(_ALL_NS), "unshare")
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we mount propagates to the host
    child = os.fork()
    if child:
        os.close(status_fd)
        _, st = os.waitpid(child, 0)
        os._exit(os.WEXITSTATUS(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st))
    # ---- PID 1 of the new PID namespace: dies with the launcher, takes everything with it
    _check(libc.prctl(_PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "prctl")
    stdin_fd = os.open(stdin_path, os.O_RDONLY)
    root = os.path.join(tmp, "root")
    os.mkdir(root)
    _mount(libc, "tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={int(lim['work_mb'])}m,mode=755")
    for link in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
        src = "/" + link
        if os.path.islink(src):
            os.symlink(os.readlink(src), os.path.join(root, link))
        elif os.path.isdir(src):
            _bind_ro(libc, src, root)
    _bind_ro(libc, "/usr", root)
    if not spec["prefix"].startswith("/usr/"):
        _bind_ro(libc, spec["prefix"], root)  # the interpreter's stdlib (e.g. a pyenv build under /root)
    os.makedirs(os.path.join(root, "dev"))
    for dev in ("null", "zero", "urandom", "random"):
        target = os.path.join(root, "dev", dev)
        open(target, "w").close()
        _mount(libc, "/dev/" + dev, target, None, _MS_BIND)
    os.makedirs(os.path.join(root, "dev/shm"))  # POSIX semaphores (multiprocessing) live here
    _mount(libc, "tmpfs", os.path.join(root, "dev/shm"), "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
           "size=16m,mode=1777")
    os.makedirs(os.path.join(root, "proc"))
    _mount(libc, "proc", os.path.join(root, "proc"), "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    os.makedirs(os.path.join(root, "tmp"))
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    work = os.path.join(root, "sandbox")
    os.mkdir(work, 0o700)
    _write_work_files(work, spec, uid)
    os.chroot(root)
    os.chdir("/sandbox")
    pid = os.fork()
    if pid == 0:
        # ---- the program: fresh uid, limits, no way to regain privileges
        os.dup2(stdin_fd, 0)
        os.close(stdin_fd)
        os.close(status_fd)
        _set_rlimits(lim)  # in a user namespace RLIMIT_NPROC counts only that namespace's tasks
        if uid is not None:
            _drop_privileges(uid, libc)
        else:
            libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        os.execve(spec["python"], argv, env)
    os.close(stdin_fd)
    # Reap everything (orphans re-parent to PID 1) until the program itself is gone; our exit
    # then makes the kernel kill whatever is left in the namespace.
    st = 0
    while True:
        try:
            done, st = os.wait()
        except ChildProcessError:
            break
        if done == pid:
            break
    line = f"exit {os.WEXITSTATUS(st)}" if os.WIFEXITED(st) else f"signal {os.WTERMSIG(st)}"
    os.write(status_fd, line.encode())
    os._exit(0)


def _launch_rlimits_only(tmp: str, spec: dict, argv: list, env: dict, stdin_path: str, status_fd: int) -> None:
    """No namespaces: become the program in a work dir under the host temp folder."""
    work = os.path.join(tmp, "work")
    os.mkdir(work)
    # As root, drop to a fresh uid (so RLIMIT_NPROC holds) when the interpreter is reachable
    # by others; otherwise (e.g. a Python under /root) the pids cgroup is the only count limit.
    uid = SANDBOX_UID_BASE + os.getpid() if os.geteuid() == 0 and _world_usable(spec["python"]) else None
    _write_work_files(work, spec, uid)
    if uid is not None:
        os.chown(tmp, uid, uid)
    os.chdir(work)
    fd = os.open(stdin_path, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    os.close(status_fd)
    nproc = None if uid is not None else _tasks_of_uid(os.getuid()) + spec["limits"]["max_procs"]
    _set_rlimits(spec["limits"], nproc)
    if uid is not None:
        _drop_privileges(uid)
    env["HOME"] = work
    env["TMPDIR"] = work
    os.execve(spec["python"], argv, env)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        probe_main()
    elif sys.argv[1:2] == ["--launch"] and len(sys.argv) == 3:
        launch_main(sys.argv[2])
    else:
        print("internal helper of reward.sandbox", file=sys.stderr)
        sys.exit(2)
