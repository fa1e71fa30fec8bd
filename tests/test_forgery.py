"""Forged verdicts: tested code that tries to make the judge report a pass it did not earn.

Every forgery runs through the real sandbox, the way training data is judged: code tests via
``test_job`` + ``call_function`` / ``SandboxPool.call_many`` (stage ``code_feedback``) and
``code_pass_rate`` (evaluation); verifier functions via ``call_function`` / ``pass_rates``
(stage ``if_feedback``). Each must yield a failing verdict, while the honest control passes.
"""

from __future__ import annotations

import pytest

from reward import code_tests as ct
from reward import sandbox as sb
from reward.code_tests import code_pass_rate
from reward.if_verifiers import pass_rates
from reward.sandbox import SandboxLimits, SandboxPool, call_function

ISOLATED = sb.isolation_info()["mode"] in ("namespaces", "userns")
LIM = SandboxLimits(timeout_s=8.0, memory_mb=256, max_procs=16, allow_network=not ISOLATED)
TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 1) == 0"]
RIGHT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"

# A forgery that reads everything it can reach (the entry script, its files, its stdin, /proc)
# for a nonce or the tests, then prints result lines in every format it can think of and
# writes them to every file descriptor.
SNOOP = r'''
import os, re, glob
found = []
for path in glob.glob('/sandbox/**', recursive=True) + ['/proc/self/cmdline', '/proc/self/environ']:
    try:
        found.append(open(path, errors='replace').read())
    except OSError:
        pass
try:
    found.append(os.read(0, 1 << 20).decode(errors='replace'))
except OSError:
    pass
tokens = set(re.findall(r'[0-9a-f]{16,}', ' '.join(found)))
for t in list(tokens) + ['0' * 32]:
    for line in ('@@RESULT-%s@@[true, true, true]' % t, '{"values": [true, true, true]}'):
        print(line, flush=True)
for fd in range(3, 256):
    for blob in (b'{"values": [true, true, true]}', b'\x00\x00\x00\x0b{"ok":true}'):
        try:
            os.write(fd, blob)
        except OSError:
            pass
'''

# The same, from inside the tested function: write the forged result line straight to the
# process's stdout and leave before the harness writes its own.
NONCE_EXIT = r'''
import os, re, glob
def add(a, b):
    text = ''
    for path in glob.glob('/sandbox/**', recursive=True):
        try:
            text += open(path, errors='replace').read()
        except OSError:
            pass
    for t in set(re.findall(r'(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])', text)):  # the old driver's nonce
        os.write(1, ('\n@@RESULT-%s@@[true, true, true]\n' % t).encode())
    os._exit(0)
'''

FORGERIES = {
    "nonce_then_exit": NONCE_EXIT,
    # the old adapter exec'd each test through the name `exec`, which resolved to the solution's
    "exec_override": WRONG + "exec = lambda *a, **k: None\n",
    "nonce_and_every_fd": WRONG + SNOOP,
    "json_dumps_replaced": "import json\njson.dumps = lambda *a, **k: '[true, true, true]'\n"
                           "json.encoder.c_make_encoder = None\njson.JSONEncoder.encode = lambda *a: '{\"ok\": true}'\n"
                           + WRONG,
    "always_equal_object": "class A:\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
                           "    __bool__ = lambda s: True\n\ndef add(a, b):\n    return A()\n",
    "int_subclass_equal_to_all": "class I(int):\n    __eq__ = lambda s, o: True\n    __hash__ = int.__hash__\n\n"
                                 "def add(a, b):\n    return I(a - b)\n",
    "builtins_patched": "import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n"
                        "builtins.isinstance = lambda *a: True\nbuiltins.len = lambda *a: 0\n" + WRONG,
    "exit_before_tests": "import os\nos._exit(0)\n" + RIGHT,
    "sys_exit_in_call": "import sys\ndef add(a, b):\n    sys.exit(0)\n",
    "exit_in_call": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "kill_the_judge": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + RIGHT,
    "stop_the_judge": "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\n" + RIGHT,
    "ptrace_the_judge": r'''
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
judge = os.getppid()
libc.ptrace(16, judge, 0, 0)  # PTRACE_ATTACH
try:
    with open('/proc/%d/mem' % judge, 'r+b') as f:
        f.write(b'x')
except OSError:
    pass
''' + WRONG,
    "fake_runner_name": "def _cf_run(t):\n    return True\n\ndef run_test(t):\n    return True\n" + WRONG,
    "forged_greeting_and_replies": r'''
import os, json
def frame(obj):
    b = json.dumps(obj).encode()
    return len(b).to_bytes(4, 'big') + b
for fd in range(3, 64):
    try:
        os.write(fd, frame({"names": {"add": {"V": 3, "c": False}}}) + frame({"ok": 3}) * 10)
    except OSError:
        pass
''' + WRONG,
}


def _honest_control():
    res, vals = call_function(*ct.test_job(RIGHT, TESTS, 2.0), limits=LIM)
    assert res.status == "ok" and vals == [True] * len(TESTS)


@pytest.fixture(scope="module", autouse=True)
def needs_isolation():
    if not ISOLATED:
        pytest.skip("forgery tests run the tested code as it is: they need the namespaces sandbox")


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_code_test_forgery_fails(name):
    _honest_control()
    res, vals = call_function(*ct.test_job(FORGERIES[name], TESTS, 2.0), limits=LIM)
    assert not any(v is True for v in vals), (name, res, vals)


def test_forgeries_fail_through_the_pool_and_the_evaluator():
    jobs = [ct.test_job(src, TESTS, 2.0) for src in [RIGHT] + [FORGERIES[k] for k in sorted(FORGERIES)]]
    with SandboxPool(workers=2, limits=LIM) as pool:
        results = pool.call_many(jobs)
    assert results[0][1] == [True] * len(TESTS)
    for name, (res, vals) in zip(sorted(FORGERIES), results[1:]):
        assert not any(v is True for v in vals), (name, res, vals)
    for name in ("exec_override", "json_dumps_replaced", "always_equal_object"):
        assert code_pass_rate("```python\n" + FORGERIES[name] + "```", TESTS, test_timeout_s=2.0) == 0.0
    assert code_pass_rate("```python\n" + RIGHT + "```", TESTS, test_timeout_s=2.0) == 1.0


def test_solution_never_sees_the_answer_key():
    secret = "31337424242"
    res, vals = call_function(*ct.test_job(WRONG + SNOOP + r'''
import gc
for o in gc.get_objects():
    if isinstance(o, str) and 'assert' in o:
        print('FOUND', o)
for pid in os.listdir('/proc'):
    for part in ('cmdline', 'environ', 'mem'):
        try:
            print(open('/proc/%s/%s' % (pid, part), 'rb').read(4096))
        except OSError:
            pass
''', [f"assert add(2, 2) == {secret}"], 2.0), limits=LIM)
    assert vals[0] is not True
    assert secret not in res.stdout and secret not in res.stderr


# ---------------------------------------------------------------- verifier functions (IF feedback)

VERIFIER_FORGERIES = {
    "json_dumps_replaced": "import json\njson.dumps = lambda *a, **k: '[true]'\n"
                           "json.encoder.c_make_encoder = None\n",
    "nonce_and_every_fd": SNOOP,
    "nonce_then_exit": NONCE_EXIT.replace("def add(a, b):", "def evaluate(response):").replace(
        "[true, true, true]", "[true]"),
    "builtins_patched": "import builtins\nbuiltins.bool = lambda *a: True\nbuiltins.isinstance = lambda *a: True\n",
    "truthy_object": "class T:\n    __bool__ = lambda s: True\n    __eq__ = lambda s, o: True\n"
                     "def evaluate(response):\n    return T()\n",
    "one_not_true": "def evaluate(response):\n    return 1\n",
}


@pytest.mark.parametrize("name", sorted(VERIFIER_FORGERIES))
def test_verifier_forgery_reports_false(name):
    src = VERIFIER_FORGERIES[name]
    if "def evaluate" not in src:
        src += "\ndef evaluate(response):\n    return False\n"
    res, vals = call_function(src, "evaluate", ["some response"], limits=LIM)
    assert vals[0] is not True, (name, res, vals)
    with SandboxPool(workers=1, limits=LIM) as pool:
        assert pass_rates([src], ["some response"], pool) == [0.0]
    # the control: the same harness reports an honest True
    res, vals = call_function("def evaluate(response):\n    return True\n", "evaluate", ["x"], limits=LIM)
    assert vals == [True]


def test_judge_process_is_out_of_reach():
    """The tested code sees neither the judge nor PID 1 in /proc and cannot signal the test children."""
    src = r'''
import os
def add(a, b):
    mine = os.getpid()
    return sorted(int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) != mine)
'''
    res, vals = call_function(*ct.test_job(src, ["assert add(0, 0) == [] or print(add(0, 0)) or False"], 2.0),
                              limits=LIM)
    # the judge (non-dumpable) and PID 1 (root / privileged) are hidden: only the tested code's own processes
    assert vals == [True], (res, vals)
