"""The judge that runs inside the sandbox for ``reward.sandbox.call_function`` (standard library only).

Input: it is copied into the sandbox as ``main.py`` and run as ``python -I -S -B main.py``; the
tested code is ``solution.py`` next to it; the job arrives on stdin as JSON ``{"mode": "call" |
"tests", "func": NAME, "inputs": [...], "test_timeout_s": T}``. Output: one JSON object on fd 3,
a pipe that only this process holds: ``{"values": [...]}`` (call mode: the function's value per
input, or ``{"error": ...}``; tests mode: ``true`` per passing test, else ``{"error": ...}``), or
``{"died": "exit N" | "signal N"}`` when, in call mode, the tested code's process died.

Why it is built this way: verdicts must not be forgeable by the tested code. So the tested code
never runs in this process. It runs in a separate "server" process that answers calls
(function name + arguments in, a value out) with PLAIN DATA only (None, bool, int, float, str,
bytes, complex, list, tuple, dict, set; anything else stays there and is reached through an
opaque handle that refuses comparison). The judge compares; a test runs in a fresh child of the
judge that calls the server through those requests; its verdict travels on a pipe the server
never had. This process is non-dumpable (``PR_SET_DUMPABLE 0``): the server, under the same uid,
cannot ptrace it or open its ``/proc/PID/{mem,fd}``. The server is forked before the job (the
tests and their expected values) is read, and restarted from a fresh interpreter, so the
answer key is never in its memory or files. Whatever the tested code does to its own process
(replace ``exec``, ``json.dumps``, builtins, write anything anywhere it can) only changes the
values it claims its functions returned, which is all a function can do anyway.
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import sys
from collections.abc import Callable

RESULT_FD = 3
MAX_MSG = 64 << 20  # bytes of one message; a bigger one is a protocol error
GRACE_S = 0.5  # after a test's deadline: time for the interrupted call to come back before a restart
_OPAQUE = "a %s returned by the solution is not plain data (tests compare plain data only)"


# ---------------------------------------------------------------- plain data <-> JSON
# The functions below keep their own references to what they use (default arguments, taken
# when this module loads, before any tested code runs): a tested program that replaces
# json.dumps, the json encoder's internals, builtins or os functions changes nothing here.


def _json_dumper() -> Callable[[object], str]:
    from json import encoder as _e

    def no_default(o):
        raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")

    if _e.c_make_encoder is None:  # a Python build without the C accelerator
        return json.JSONEncoder(separators=(",", ":"), default=no_default).encode
    enc = _e.c_make_encoder(None, no_default, _e.c_encode_basestring_ascii, None, ":", ",", False, False, True)

    def dumps(obj, _join="".join, _enc=enc):
        return _join(_enc(obj, 0))
    return dumps


_DUMPS = _json_dumper()
_LOADS = json.JSONDecoder().decode


def encode(v: object, handles: list | None = None, depth: int = 0, _type=type, _isinstance=isinstance, _len=len, _callable=callable,
           _tuple=tuple, _set=set, _frozenset=frozenset, _dict=dict, _list=list, _int=int, _float=float,
           _str=str, _bool=bool, _bytes=bytes, _bytearray=bytearray, _complex=complex, _TypeError=TypeError,
           _ValueError=ValueError) -> object:
    """JSON for a plain value (tags keep tuple/set/dict/bytes apart); others become handles or raise."""
    if depth > 500:
        raise _ValueError("value nested too deeply")
    tuple, set, frozenset, dict, list, int, float, str = _tuple, _set, _frozenset, _dict, _list, _int, _float, _str
    bool, bytes, bytearray, complex = _bool, _bytes, _bytearray, _complex
    isinstance, TypeError = _isinstance, _TypeError
    t = _type(v)
    if v is None or t is bool or t is int or t is float or t is str:
        return v
    d = depth + 1
    if t is list:
        return [encode(x, handles, d) for x in v]
    if t is Remote and handles is None:  # judge side: an argument that is a solution object
        return {"R": v._target}
    # subclasses of plain types (IntEnum, defaultdict, namedtuple...) travel as their base value
    for base, tag in ((tuple, "T"), (set, "S"), (frozenset, "F")):
        if isinstance(v, base):
            return {tag: [encode(x, handles, d) for x in base.__iter__(v)]}
    if isinstance(v, dict):
        return {"D": [[encode(k, handles, d), encode(x, handles, d)] for k, x in dict.items(v)]}
    if isinstance(v, list):
        return [encode(x, handles, d) for x in list.__iter__(v)]
    if isinstance(v, bool):
        return bool(v)
    if isinstance(v, int):
        return int.__int__(v)
    if isinstance(v, float):
        return float.__float__(v)
    if isinstance(v, str):
        return str.__str__(v)
    if isinstance(v, (bytes, bytearray)):
        return {"B" if isinstance(v, bytes) else "Y": bytes(v).hex()}
    if isinstance(v, complex):
        return {"C": [v.real, v.imag]}
    if handles is None:
        raise TypeError(f"Object of type {t.__name__} is not JSON serializable")
    handles.append(v)
    return {"H": [_len(handles) - 1, t.__name__]}


def decode(x: object, handle: Callable | None = None, depth: int = 0) -> object:
    """The value ``encode`` described; ``handle(tag_value, kind)`` resolves ``H``/``R`` tags."""
    if depth > 500:
        raise ValueError("value nested too deeply")
    if x is None or type(x) in (bool, int, float, str):
        return x
    d = depth + 1
    if type(x) is list:
        return [decode(y, handle, d) for y in x]
    if type(x) is not dict or len(x) != 1:
        raise ValueError("malformed value")
    ((tag, v),) = x.items()
    if tag in ("T", "S", "F"):
        items = [decode(y, handle, d) for y in v]
        return tuple(items) if tag == "T" else set(items) if tag == "S" else frozenset(items)
    if tag == "D":
        return {decode(k, handle, d): decode(y, handle, d) for k, y in v}
    if tag in ("B", "Y"):
        return bytes.fromhex(v) if tag == "B" else bytearray.fromhex(v)
    if tag == "C":
        return complex(float(v[0]), float(v[1]))
    if tag in ("H", "R") and handle is not None:
        return handle(v, tag)
    raise ValueError(f"unexpected tag {tag!r}")


# ---------------------------------------------------------------- framing

def send(fd: int, obj: object, _dumps=_DUMPS, _write=os.write, _len=len, _str=str, _int=int) -> None:
    """Write one length-prefixed JSON message."""
    data = _str.encode(_dumps(obj))
    data = _int.to_bytes(_len(data), 4, "big") + data
    while data:
        data = data[_write(fd, data):]


def _read_exact(fd: int, n: int, _read=os.read, _len=len, _min=min) -> bytes | None:
    buf = b""
    while _len(buf) < n:
        chunk = _read(fd, _min(n - _len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return buf


def recv(fd: int, _read_exact=_read_exact, _loads=_LOADS, _int=int, _bytes=bytes) -> object:
    """Read one message (None at end of stream)."""
    head = _read_exact(fd, 4)
    if head is None:
        return None
    n = _int.from_bytes(head, "big")
    if n > MAX_MSG:
        raise ValueError(f"message of {n} bytes")
    body = _read_exact(fd, n)
    if body is None:
        return None
    return _loads(_bytes.decode(body))


def _flush() -> None:
    """Flush what the tested code printed (processes here leave with ``os._exit``)."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except BaseException:  # noqa: BLE001, S110 - replaced or closed by the tested code
            pass


def _describe(e: BaseException) -> str:
    try:
        return f"{type(e).__name__}: {str(e)[:200]}"
    except BaseException:  # noqa: BLE001 - a hostile __str__
        return "error"


# ---------------------------------------------------------------- the server (runs the tested code)

class _Interrupted(TimeoutError):
    pass


def serve(rfd: int, wfd: int) -> None:
    """Load ``solution.py`` and answer requests until the request stream ends (never returns)."""
    handles = []
    busy = [False]

    def on_deadline(signum, frame):
        if busy[0]:
            raise _Interrupted("the call was interrupted at the test's deadline")

    signal.signal(signal.SIGUSR1, on_deadline)
    g = {"__name__": "solution", "__builtins__": builtins}
    # local references, taken before the tested code can replace module attributes
    _send, _recv, _enc, _dec, _exec, _compile = send, recv, encode, decode, exec, compile
    try:
        with open("solution.py", encoding="utf-8") as f:
            src = f.read()
        _exec(_compile(src, "solution.py", "exec"), g)
    except BaseException as e:  # noqa: BLE001 - SystemExit at load is a load error too
        _flush()
        _send(wfd, {"load_error": _describe(e)})
        os._exit(0)
    _flush()
    names = {}
    for k, v in list(g.items()):
        if k.startswith("__") and k.endswith("__"):
            continue
        if type(v) is type(os):
            names[k] = {"M": str(getattr(v, "__name__", ""))}
            continue
        try:
            names[k] = {"V": _enc(v, handles), "c": callable(v)}
        except BaseException:  # noqa: BLE001, S112 - not describable: skip the name
            continue
    _send(wfd, {"names": names})

    def resolve(v, tag):
        if tag == "R":
            return g[v["g"]] if "g" in v else handles[v["h"]]
        return handles[v[0]]

    while True:
        req = _recv(rfd)
        if req is None:
            _flush()
            os._exit(0)
        busy[0] = True
        try:
            t = req["t"]
            obj = g[t["g"]] if "g" in t else handles[t["h"]]
            op = req["op"]
            if op == "call":
                value = obj(*[_dec(a, resolve) for a in req["a"]], **{k: _dec(v, resolve) for k, v in req["k"].items()})
            elif op == "attr":
                value = getattr(obj, req["n"])
            elif op == "iter":
                value = list(obj)
            elif op == "len":
                value = len(obj)
            elif op == "bool":
                value = bool(obj)
            elif op == "item":
                value = obj[_dec(req["x"], resolve)]
            else:  # "contains"
                value = _dec(req["x"], resolve) in obj
            busy[0] = False
            out = {"ok": _enc(value, handles)}
        except BaseException as e:  # noqa: BLE001 - the call's exception is its result
            busy[0] = False
            try:
                out = {"err": [type(e).__name__, str(e)[:200]]}
            except BaseException:  # noqa: BLE001
                out = {"err": ["Exception", "error"]}
        _flush()
        _send(wfd, out)


# ---------------------------------------------------------------- the judge side: proxies for the tests

class Remote:
    """A name or object of the solution, reached by requests; it refuses comparison and hashing."""

    __slots__ = ("_kind", "_target")

    def __init__(self, target: dict, kind: str) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_kind", kind)

    def _ask(self, op, **kw):
        return _rpc(dict(op=op, t=self._target, **kw))

    def __call__(self, *a, **k):
        return self._ask("call", a=[encode(x) for x in a], k={n: encode(v) for n, v in k.items()})

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._ask("attr", n=name)

    def __iter__(self):
        items = self._ask("iter")
        return iter(items if type(items) is list else [])

    def __len__(self):
        n = self._ask("len")
        if type(n) is not int:
            raise TypeError("len() of a solution object is not an int")
        return n

    def __bool__(self):
        return self._ask("bool") is True

    def __getitem__(self, key):
        return self._ask("item", x=encode(key))

    def __contains__(self, x):
        return self._ask("contains", x=encode(x)) is True

    def _refuse(self, *_):
        raise TypeError(_OPAQUE % self._kind)

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self):
        return f"<{self._kind} of the solution>"


_CHANNEL = {}


class _OutOfSync(Exception):
    pass


def _rpc(req: dict) -> object:
    send(_CHANNEL["w"], req)
    rep = recv(_CHANNEL["r"])
    if rep is None:
        raise _OutOfSync("the solution's process died")
    if type(rep) is not dict:
        raise _OutOfSync("malformed reply")
    if "err" in rep:
        name, msg = (list(rep["err"]) + ["", ""])[:2]
        cls = getattr(builtins, str(name), None)
        if isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ == "builtins":
            raise cls(str(msg))
        raise RuntimeError(f"{name}: {msg}")
    return decode(rep.get("ok"), _handle_proxy)


def _handle_proxy(v: list, tag: str) -> Remote:
    if tag != "H":
        raise ValueError("unexpected reference in a reply")
    return Remote({"h": int(v[0])}, str(v[1]))


# ---------------------------------------------------------------- the judge

def _nondumpable() -> None:
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")


class _Server:
    """The tested code's process, as seen from the judge."""

    def __init__(self, fresh: bool) -> None:
        r1, w1 = os.pipe()  # judge -> server
        r2, w2 = os.pipe()  # server -> judge
        pid = os.fork()
        if pid == 0:
            try:
                devnull = os.open("/dev/null", os.O_RDONLY)
                os.dup2(devnull, 0)
                for fd in (r1, w2):
                    os.set_inheritable(fd, True)
                keep = sorted({0, 1, 2, r1, w2})
                lo = 3
                for fd in keep[3:] + [1 << 16]:  # close everything else (fd 3, the verdict pipe, included)
                    os.closerange(lo, fd)
                    lo = fd + 1
                if fresh:  # a clean interpreter: nothing of the judge's memory (the tests) comes along
                    os.execv(sys.executable, [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__),
                                              "--serve", str(r1), str(w2)])
                serve(r1, w2)
            finally:
                os._exit(70)
        os.close(r1)
        os.close(w2)
        self.pid, self.w, self.r = pid, w1, r2
        self.status = None

    def hello(self) -> dict | str:
        """The names the solution defines, or a load error string."""
        try:
            rep = recv(self.r)
        except ValueError as e:
            return f"ProtocolError: {e}"
        if rep is None:
            return f"the solution's process {self.reap()} while loading"
        if type(rep) is not dict:
            return "ProtocolError: malformed greeting"
        if "load_error" in rep:
            return str(rep["load_error"])
        return rep.get("names") if type(rep.get("names")) is dict else "ProtocolError: no names"

    def reap(self, block: bool = True) -> str | None:
        """``exit N`` / ``signal N`` once the process ended (None while it runs)."""
        if self.status is None:
            pid, st = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            if pid == 0:
                return None
            self.status = f"exit {os.WEXITSTATUS(st)}" if os.WIFEXITED(st) else f"signal {os.WTERMSIG(st)}"
        return self.status

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.reap()
        self.close()

    def close(self) -> None:
        for fd in (self.w, self.r):
            try:
                os.close(fd)
            except OSError:
                pass


_NO_IMPORT = {"antigravity", "this", "__hello__", "__phello__", "idlelib", "tkinter", "turtle", "turtledemo"}


def _namespace(names: dict) -> dict:
    """The globals a test runs in: the solution's names as data, stdlib modules or proxies."""
    import importlib

    g = {"__name__": "__test__", "__builtins__": builtins}
    for k, desc in names.items():
        if not isinstance(k, str) or k.startswith("__") or type(desc) is not dict:
            continue
        try:
            if "M" in desc:
                top = str(desc["M"]).split(".")[0]
                if top in sys.stdlib_module_names and top not in _NO_IMPORT:
                    g[k] = importlib.import_module(desc["M"])
                continue
            v = desc["V"]
            try:
                g[k] = decode(v)  # plain data: the test gets the value itself
            except ValueError:  # an object, or data holding objects: reached through requests
                g[k] = Remote({"g": k}, str(v["H"][1]) if type(v) is dict and "H" in v else "value")
        except Exception:  # noqa: BLE001, S112 - a name we cannot offer is simply absent
            continue
    return g


def _run_test(test: str, g: dict, vfd: int) -> None:
    """In a forked child: run one test statement; report P, or F/S + a message, on ``vfd``."""
    try:
        exec(compile(test, "<test>", "exec"), g)  # noqa: S102 - the test, in its own throw-away process
        msg = "P"
    except _OutOfSync as e:
        msg = "S" + _describe(RuntimeError(str(e)))
    except BaseException as e:  # noqa: BLE001
        msg = "F" + _describe(e)
    _flush()
    try:
        os.write(vfd, msg.encode("utf-8", "replace")[:4000])
    finally:
        os._exit(0)


def _wait_verdict(fd: int, pid: int, deadline: float) -> str | None:
    """Read a test child's verdict until EOF; None if the deadline passed first."""
    import select
    import time

    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                os.waitpid(pid, 0)
                return buf.decode("utf-8", "replace")
            buf += chunk


def _judge_tests(tests: list, timeout_s: float, server: _Server | None) -> list:
    import time

    out = []
    names = None
    for test in tests:
        if server is None:
            server = _Server(fresh=True)
            names = None
        if names is None:
            names = server.hello()
            base = _namespace(names) if type(names) is dict else None
        if base is None:
            out.append({"error": str(names)})
            continue
        _CHANNEL.update(w=server.w, r=server.r)
        vr, vw = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(vr)
            os.close(RESULT_FD)
            _run_test(test, dict(base), vw)
        os.close(vw)
        verdict = _wait_verdict(vr, pid, time.monotonic() + timeout_s)
        restart = False
        if verdict is None:  # deadline: interrupt the call; restart if it does not come back
            try:
                os.kill(server.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
            late = _wait_verdict(vr, pid, time.monotonic() + GRACE_S)
            restart = late is None or late.startswith("S")
            if late is None:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            verdict = f"FTimeoutError: test took longer than {timeout_s} s"
        os.close(vr)
        if verdict == "P":
            out.append(True)
        else:
            restart = restart or verdict.startswith("S") or not verdict
            out.append({"error": verdict[1:] or "the test's process died"})
        if restart or server.reap(block=False) is not None:
            server.kill()
            server = None
    if server is not None:
        server.kill()
    return out


def _judge_calls(func: str, inputs: list, server: _Server) -> dict:
    names = server.hello()
    if type(names) is not dict:
        return {"values": [{"error": str(names)} for _ in inputs]}
    if not (func in names and names[func].get("c")):
        return {"values": [{"error": f"function {func} not defined"} for _ in inputs]}
    out = []
    for x in inputs:
        send(server.w, {"op": "call", "t": {"g": func}, "a": [encode(x)], "k": {}})
        try:
            rep = recv(server.r)
        except ValueError:
            rep = None
        if type(rep) is not dict:
            server.kill()
            return {"died": server.reap() or "exit 1"}
        if "err" in rep:
            name, msg = (list(rep["err"]) + ["", ""])[:2]
            out.append({"error": f"{name}: {msg}"})
            continue
        try:
            v = decode(rep.get("ok"), _not_json)
            out.append(json.loads(json.dumps(v, allow_nan=True)))
        except Exception as e:  # noqa: BLE001 - not JSON data: the call's error
            out.append({"error": _describe(e)})
    server.kill()
    return {"values": out}


def _not_json(v: list, tag: str) -> object:
    raise TypeError(f"Object of type {v[1] if tag == 'H' else '?'} is not JSON serializable")


def main() -> None:
    """Judge one job (see the module docstring)."""
    _nondumpable()
    server = _Server(fresh=False)  # before the job is read: the answer key is not in its memory
    raw = b""
    while chunk := os.read(0, 1 << 20):
        raw += chunk
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    job = json.loads(raw)
    del raw
    if job["mode"] == "tests":
        result = {"values": _judge_tests(job["inputs"], float(job["test_timeout_s"]), server)}
    else:
        result = _judge_calls(job["func"], job["inputs"], server)
    data = json.dumps(result).encode()
    while data:
        data = data[os.write(RESULT_FD, data):]
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
