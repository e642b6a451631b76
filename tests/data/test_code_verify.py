"""The code verifier and its sandbox against honest and hostile programs (needs Linux namespaces)."""

import json
import os
import shutil
import socket
import threading

import pytest

from lt_jax.data import code_verify, sandbox
from lt_jax.data.verify import get_verifier

ADD = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"}, {"input": "0 0", "output": "0"},
       {"input": "100 23", "output": "123"}]
FAST = code_verify.CodeVerifyConfig(sandbox=sandbox.SandboxConfig(run=sandbox.Limits(cpu_s=1, wall_s=3, memory_mb=256, processes=8,
                                                                                      output_bytes=1 << 16)))


pytestmark = pytest.mark.skipif(not sandbox.available(), reason="no Linux namespaces for the sandbox here")


def py(code: str) -> str:
    return f"<think>\nwrite it\n```python\nprint('not this block')\n```\n</think>\nHere:\n```python\n{code}\n```\n"


def grade(answer: str, tests=ADD, cfg=FAST, **record):
    return code_verify.verify_code(answer, {"tests": tests, **record}, cfg)


def sandbox_processes() -> list[int]:
    """pids of processes running under the sandbox's uid pool (there must be none between runs)."""
    lo = FAST.sandbox.base_uid
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
        except FileNotFoundError:
            continue
        if lo <= uid < lo + FAST.sandbox.slots:
            found.append(int(pid))
    return found


def test_correct_wrong_partial():
    assert grade(py("a, b = map(int, input().split())\nprint(a + b)")).score == 1.0
    assert grade(py("print(42)")).score == 0.0
    partial = grade(py("a, b = map(int, input().split())\nprint(a + b if b >= 0 else 0)"))
    assert partial.score == 0.75 and partial.note == "code wrong_answer"
    assert grade("no code here").note == "no code block"
    assert grade(py("print(1)"), tests=[]).note == "no tests"
    many = [{"input": "", "output": str(i)} for i in range(15)]
    assert grade(py("print(0)"), tests=many).score == pytest.approx(1 / 10)  # only the first 10 count


def test_assert_style_and_float_tolerance():
    tests = json.dumps(["assert sq(3) == 9", {"assert": "assert sq(-2) == 4"}, "assert sq(0) == 1"])
    v = grade(py("def sq(x):\n    return x * x"), tests=tests)
    assert v.score == pytest.approx(2 / 3) and v.note == "code runtime_error"
    assert code_verify.outputs_match("0.3333333\n", "0.33333333")
    assert not code_verify.outputs_match("1 2", "1 2 3") and not code_verify.outputs_match("abc", "abd")


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_cpp_stdin_stdout():
    good = "```cpp\n#include <iostream>\nint main(){long a,b;std::cin>>a>>b;std::cout<<a+b<<\"\\n\";}\n```"
    assert grade(good).score == 1.0
    assert grade("```c++\nint main( {\n```").note == "code compile_error"
    v = grade("```cpp\n#include <cstdio>\nint main(){int a,b;scanf(\"%d %d\",&a,&b);printf(\"%d\\n\",a-b);}\n```")
    assert v.score == 0.25  # only 0 0 -> 0 agrees


def test_timeout_memory_hog_and_output_flood():
    spin = grade(py("while True:\n    pass"), tests=ADD[:1])
    assert spin.score == 0.0 and spin.note == "code timeout"
    hog = grade(py("x = bytearray(2 << 30)\nprint(3)"), tests=ADD[:1])
    assert hog.score == 0.0 and hog.note == "code runtime_error"
    flood = grade(py("while True:\n    print('x' * 1000)"), tests=ADD[:1])
    assert flood.score == 0.0 and flood.note == "code output_limit"
    sleeper = grade(py("import time\ntime.sleep(60)"), tests=ADD[:1])  # wall clock, not CPU
    assert sleeper.note == "code timeout"


def test_fork_bomb_is_contained():
    bomb = py("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    v = grade(bomb, tests=ADD[:1])
    assert v.score == 0.0 and v.note in ("code timeout", "code runtime_error")
    assert sandbox_processes() == []  # every forked copy is gone
    assert grade(py("a, b = map(int, input().split())\nprint(a + b)"), tests=ADD[:1]).score == 1.0  # machine fine


def test_escape_attempts_escapes_nothing(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    reach = py(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'hi')\nprint(3)")
    assert grade(reach, tests=ADD[:1]).note == "code runtime_error"
    with pytest.raises(socket.timeout):
        listener.accept()  # nothing ever connected
    listener.close()
    target = tmp_path / "escaped.txt"
    home = os.path.join(os.path.dirname(code_verify.__file__), "escaped.txt")
    writer = py(f"for p in {[str(target), home]!r}:\n    try:\n        open(p, 'w').write('x')\n    except OSError:\n        pass\n"
                "open('mine.txt', 'w').write('ok')\nprint(3)")
    assert grade(writer, tests=ADD[:1]).score == 1.0  # writing into its own scratch is fine
    assert not target.exists() and not os.path.exists(home)
    peek = code_verify.run_tests("python", "import os\nprint(len([p for p in os.listdir('/proc') if p.isdigit()]))",
                                 [code_verify.TestCase(input="", output="2")], FAST)
    assert peek == (1, ["passed"])  # its /proc shows PID 1 and itself, not the host's processes


def test_hundreds_in_parallel_leak_nothing():
    fds_before = set(os.listdir("/proc/self/fd"))
    threads_before = threading.active_count()
    good = py("a, b = map(int, input().split())\nprint(a + b)")
    bad = py("print(0)")
    items = [(good if i % 3 else bad, {"tests": ADD[:2]}) for i in range(300)]
    verdicts = code_verify.verify_many(items, FAST, workers=16)
    assert [v.score for v in verdicts] == [1.0 if i % 3 else 0.0 for i in range(300)]
    assert set(os.listdir("/proc/self/fd")) == fds_before
    assert threading.active_count() == threads_before
    children = [p for p in filter(str.isdigit, os.listdir("/proc")) if _ppid(p) == os.getpid()]
    assert children == [] and sandbox_processes() == []


def _ppid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None


def test_registered_for_grading(tmp_path, jl):
    from lt_jax.data import grade as grade_mod

    good = py("a, b = map(int, input().split())\nprint(a + b)")
    rows = [{"problem_id": "add", "sample_index": k, "prompt": "add two ints", "response": r, "status": "ok",
             "domain": "code", "tests": ADD} for k, r in enumerate([good, py("print(3)"), "I refuse."])]
    src = jl.write(tmp_path / "responses.jsonl", rows)
    out = str(tmp_path / "graded.jsonl")
    grade_mod.grade_file(src, out, grade_mod.GradeConfig(domain="math", workers=2))  # processes share the uid pool
    got = {r["sample_index"]: r for r in jl.read(out)}
    assert [got[k]["score"] for k in range(3)] == [1.0, 0.25, 0.0]
    assert [got[k]["verdict"] for k in range(3)] == [True, False, False]
    assert get_verifier("code") is code_verify.code_verifier


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None or not os.path.exists("/usr/bin/python3"),
                    reason="needs root to start the sandbox as an unprivileged user")
def test_unprivileged_user_gets_a_user_namespace_instead():
    import subprocess

    probe = "import os, socket\nprint(os.getuid())\ntry:\n    socket.create_connection(('127.0.0.1', 22), timeout=1)\n" \
            "except OSError as e:\n    print(e.errno)\n"
    job = {"files": {"m.py": probe}, "tmpfs_mb": 16, "uid": 61000,
           "steps": [{"argv": ["/usr/bin/python3", "-I", "m.py"], "stdin": "", "wall_s": 5,
                      "limits": sandbox.Limits(processes=4096).to_job()}]}
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-I", "-S",
                          sandbox.INIT], input=json.dumps(job), capture_output=True, text=True, timeout=60)
    result = json.loads(out.stdout)
    if "error" in result:
        pytest.skip(f"no unprivileged user namespaces here: {result['error']}")
    assert result["results"][0]["stdout"].split() == ["0", "101"]  # root of its own namespace; ENETUNREACH
