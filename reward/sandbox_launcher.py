"""The process that sets up one sandbox execution (run as a script by ``reward.sandbox``).

Input: ``python -I -S -B sandbox_launcher.py --launch DIR`` where ``DIR/spec.bin`` is a
``marshal``-ed dict (code, files, limits, the per-process rlimits ``rl``, interpreter,
cgroups, status fd, optional result fd), or ``--probe``. Output: the program's
stdout/stderr pass through; one status line (``exit N`` / ``signal N``) is written to the
inherited status fd; the result fd, when given, becomes the program's fd 3.

It runs once per execution, so it imports only builtin-speed modules (os, sys,
marshal, ctypes, resource): ``json``/``re``/``dataclasses`` would double the
start-up cost. The steps and why they are there are described in
``reward/sandbox.py``.
"""

import marshal
import os
import sys

SANDBOX_UID_BASE = 1_200_000  # sandbox uids are BASE + launcher pid: unused by any real account
SIGKILL = 9

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWPID, _CLONE_NEWNET, _CLONE_NEWUSER = 0x20000000, 0x40000000, 0x10000000
_CLONE_NEWCGROUP = 0x02000000
_ALL_NS = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS = 1, 4, 38
RESULT_FD = 3  # where the program finds the result pipe (call_function's judge writes its verdicts there)
# keyctl(2) / add_key(2) syscall numbers; other architectures get no keyring isolation (reported by --probe)
_KEYCTL_NR = {"x86_64": 250, "aarch64": 219, "riscv64": 219}
_KEYCTL_JOIN_SESSION_KEYRING, _KEYCTL_CLEAR, _KEYCTL_UNLINK, _KEYCTL_GET_PERSISTENT = 1, 7, 9, 22
_KEY_SPEC_SESSION, _KEY_SPEC_USER, _KEY_SPEC_USER_SESSION = -3, -4, -5
_ENOSYS, _EOPNOTSUPP, _EINVAL = 38, 95, 22


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


def _unshare(libc, flags: int) -> None:
    """``unshare(flags)`` with a new cgroup namespace too (hides the host's cgroup paths) where the kernel has one."""
    if libc.unshare(flags | _CLONE_NEWCGROUP) != 0:
        _check(libc.unshare(flags), "unshare")


def _enter_userns(libc) -> None:
    """New user namespace (plus the others) mapping only our own uid/gid to themselves."""
    uid, gid = os.getuid(), os.getgid()
    _unshare(libc, _ALL_NS | _CLONE_NEWUSER)
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _keyctl(libc, *args) -> int:
    import ctypes

    nr = _KEYCTL_NR.get(os.uname().machine)
    if nr is None:
        raise OSError(_ENOSYS, "keyctl: syscall number unknown on this architecture")
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    if r == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"keyctl({args[0]}): {os.strerror(e)}")
    return r


def fresh_keyrings(libc, clear_user: bool) -> bool:
    """Give this process a new empty session keyring; with ``clear_user`` also wipe its uid's user keyrings.

    The session keyring is inherited through fork and exec: without this the program could
    read, change or add keys of whoever launched it. The user keyrings belong to the uid and
    outlive the run: for a per-run sandbox uid (a later run may get the same uid) they are
    cleared; never for the caller's own uid. False when the kernel has no keyrings (nothing to
    share then); raises when isolation failed.
    """
    try:
        _keyctl(libc, _KEYCTL_JOIN_SESSION_KEYRING, None)
    except OSError as e:
        if e.errno == _ENOSYS:
            return False
        raise
    if not clear_user:
        return True
    for spec in (_KEY_SPEC_USER, _KEY_SPEC_USER_SESSION):
        _keyctl(libc, _KEYCTL_CLEAR, spec)
    try:
        pk = _keyctl(libc, _KEYCTL_GET_PERSISTENT, -1, _KEY_SPEC_SESSION)
    except OSError as e:
        if e.errno not in (_EOPNOTSUPP, _ENOSYS, _EINVAL):
            raise
    else:
        _keyctl(libc, _KEYCTL_CLEAR, pk)
        _keyctl(libc, _KEYCTL_UNLINK, pk, _KEY_SPEC_SESSION)
    return True


def probe_main() -> None:
    """Try the namespaces in throw-away children; print ``netns=1 pidns=1 mountns=1 userns=1``-style words."""
    res = []
    for key, flag in (("netns", _CLONE_NEWNET), ("pidns", _CLONE_NEWPID), ("mountns", _CLONE_NEWNS),
                      ("userns", None), ("cgroupns", _CLONE_NEWCGROUP), ("keyring", -1)):
        pid = os.fork()
        if pid == 0:
            try:
                libc = _libc()
                if flag is None:  # the unprivileged path: all namespaces under a new user namespace
                    _enter_userns(libc)
                    _mount(libc, "tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m")
                elif flag == -1:
                    os._exit(0 if fresh_keyrings(libc, clear_user=False) else 1)
                else:
                    _check(libc.unshare(flag), "unshare")
                os._exit(0)
            except BaseException:  # noqa: BLE001
                os._exit(1)
        _, st = os.waitpid(pid, 0)
        res.append(f"{key}={int(os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0)}")
    print(" ".join(res))


def _set_rlimits(lim: dict, rl: dict, nproc: int | None = None) -> None:
    import resource

    mb = 1024 * 1024
    cpu = lim["cpu_s"] if lim["cpu_s"] is not None else lim["timeout_s"]
    cpu = max(1, int(cpu + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # soft: SIGXCPU, hard: SIGKILL a second later
    # address space per process: the whole budget under a memory cgroup, a share of it without one
    resource.setrlimit(resource.RLIMIT_AS, (rl["as_mb"] * mb, rl["as_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["max_file_mb"] * mb, lim["max_file_mb"] * mb))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    # counted per real uid (threads too), never enforced for root: exact with a fresh uid; for a
    # shared uid the caller passes what that uid already runs plus the run's share
    n = rl["nproc"] if nproc is None else nproc
    resource.setrlimit(resource.RLIMIT_NPROC, (n, n))


def _program_fds(stdin_fd: int, result_fd: int | None) -> None:
    """In the program's process: stdin on 0, the result pipe on 3, every other inherited fd closed."""
    os.dup2(stdin_fd, 0)
    if result_fd is not None:
        if result_fd != RESULT_FD:
            os.dup2(result_fd, RESULT_FD)
        os.set_inheritable(RESULT_FD, True)
    os.closerange(RESULT_FD + (result_fd is not None), 1 << 16)


def _isolate_keyrings(libc, clear_user: bool) -> None:
    try:
        fresh_keyrings(libc, clear_user)
    except OSError as e:  # never run the program with the caller's keyring
        os.write(2, f"[sandbox] keyring isolation failed: {e}\n".encode())
        os._exit(125)


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
    result_fd = spec.get("result_fd")
    for cg in spec["cgroups"]:
        with open(os.path.join(cg, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    if spec["mode"] == "rlimits":
        _launch_rlimits_only(tmp, spec, argv, env, stdin_path, status_fd, result_fd)
    libc = _libc()
    if spec["mode"] == "userns":
        # unprivileged: the program keeps our uid (the only one mapped) and, not being uid 0 in
        # the namespace, loses every capability at execve
        uid = None
        _enter_userns(libc)
    else:
        uid = SANDBOX_UID_BASE + os.getpid()
        _unshare(libc, _ALL_NS)
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we mount propagates to the host
    libc.sethostname(b"sandbox", 7)  # the UTS namespace starts with the host's name
    child = os.fork()
    if child:
        os.close(status_fd)
        if result_fd is not None:
            os.close(result_fd)
        _, st = os.waitpid(child, 0)
        os._exit(os.WEXITSTATUS(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st))
    # ---- PID 1 of the new PID namespace: dies with the launcher, takes everything with it
    _check(libc.prctl(_PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "prctl")
    # not dumpable: the program (same uid in userns mode) cannot ptrace us or open /proc/1/{fd,mem,environ}
    _check(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl")
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
    # hidepid: the program sees only processes it may ptrace, so not this PID 1 (its command line
    # names the launcher and the host's temp folder); "invisible" needs Linux 5.8, 2 is the older spelling
    try:
        _mount(libc, "proc", os.path.join(root, "proc"), "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
               "hidepid=invisible")
    except OSError:
        _mount(libc, "proc", os.path.join(root, "proc"), "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "hidepid=2")
    os.makedirs(os.path.join(root, "tmp"))
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    work = os.path.join(root, "sandbox")
    os.mkdir(work, 0o700)
    _write_work_files(work, spec, uid)
    os.chroot(root)
    os.chdir("/sandbox")
    pid = os.fork()
    if pid == 0:
        # ---- the program: fresh uid, limits, own keyrings, no way to regain privileges
        _program_fds(stdin_fd, result_fd)
        # in a user namespace RLIMIT_NPROC counts that namespace's tasks of our uid: PID 1 is one of them
        _set_rlimits(lim, spec["rl"], spec["rl"]["nproc"] + (uid is None))
        if uid is not None:
            _drop_privileges(uid, libc)
        else:
            libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        _isolate_keyrings(libc, clear_user=uid is not None)
        os.execve(spec["python"], argv, env)
    os.close(stdin_fd)
    if result_fd is not None:
        os.close(result_fd)
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


def _launch_rlimits_only(tmp: str, spec: dict, argv: list, env: dict, stdin_path: str, status_fd: int,
                         result_fd: int | None) -> None:
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
    os.close(status_fd)
    _program_fds(fd, result_fd)
    if spec["stdin"]:
        os.unlink(stdin_path)  # the work dir is next to it: do not leave the input readable by path
    nproc = None if uid is not None else _tasks_of_uid(os.getuid()) + spec["rl"]["nproc"]
    _set_rlimits(spec["limits"], spec["rl"], nproc)
    if uid is not None:
        _drop_privileges(uid)
    _isolate_keyrings(_libc(), clear_user=uid is not None)
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
