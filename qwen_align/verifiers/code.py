"""The `code` verifier: run a response's Python against the row's tests in the sandbox (`sandbox.py`).

Row fields: `tests` (Python source; plain asserts and/or a HumanEval-style `check(candidate)`) and optional
`entry_point` (with a `check` in the tests, `check(<entry_point>)` is called after the tests' top level ran).

The candidate's code and the tests never share a process. The candidate runs in its own process (C) and
only serves calls; the tests run in the judge process (P), where the candidate's functions are stand-ins
that send the arguments to C and get the answer back as plain data (None, bool, int, float, complex, str,
bytes, list, tuple, dict, set, frozenset), decoded by P. Anything else comes back as an opaque handle whose
equality is identity, so an object with an always-true `__eq__` cannot pass `assert f(x) == y`. The
verdict is P's, written after the last test and only if nothing failed and C never misbehaved (died,
exited, broke the protocol); exit status means nothing.
"""

from __future__ import annotations

import builtins
import json
import re
import struct
import sys
import threading
import traceback
import types
from typing import Any

from ..errors import DataError
from . import VerifyResult, _field
from .sandbox import SandboxConfig, SandboxPool

JUDGE = "qwen_align.verifiers.code:judge"
CANDIDATE = "qwen_align.verifiers.code:serve_candidate"

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)", re.M | re.S)
_PYTHON_TAGS = {"", "python", "py", "python3", "py3"}


def extract_code(response: str) -> str:
    """The Python in a chat response: its ```python / bare ``` blocks joined, else the whole text."""
    blocks = [body for tag, body in _FENCE.findall(response) if tag.lower() in _PYTHON_TAGS]
    return "\n".join(blocks) if blocks else response


# ---- the caller's side ----

_pool: SandboxPool | None = None
_pool_lock = threading.Lock()


def configure(config: SandboxConfig | None = None) -> SandboxPool:
    """(Re)create the shared pool the code verifier uses, e.g. with a shorter timeout or fewer workers."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
        _pool = SandboxPool(config)
        return _pool


def default_pool() -> SandboxPool:
    global _pool
    with _pool_lock:
        if _pool is None:
            import atexit

            _pool = SandboxPool()
            atexit.register(lambda: _pool and _pool.close())
        return _pool


def _job(example: dict[str, Any], response: str) -> tuple[str, dict[str, Any]]:
    tests = _field(example, "tests")
    if not isinstance(tests, str):
        raise DataError(f"verifier 'code': the field 'tests' must be Python source text, got {type(tests).__name__}")
    try:
        compile(tests, "<tests>", "exec")
    except SyntaxError as e:
        raise DataError(f"verifier 'code': the row's 'tests' do not compile ({e.msg}, line {e.lineno})") from None
    entry = example.get("entry_point")
    if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
        raise DataError(f"verifier 'code': 'entry_point' must be a function name, got {entry!r}")
    if not isinstance(response, str):
        raise DataError(f"verifier 'code': the response must be text, got {type(response).__name__}")
    return extract_code(response), {"tests": tests, "entry_point": entry}


def _to_result(res: dict[str, Any]) -> VerifyResult:
    if res.get("passed") is True:
        return VerifyResult(True, 1.0, res.get("reason") or "all tests passed")
    return VerifyResult(False, 0.0, str(res.get("reason") or res.get("status") or "failed")[:500])


def check_code(example: dict[str, Any], response: str, pool: SandboxPool | None = None) -> VerifyResult:
    code, payload = _job(example, response)
    return _to_result((pool or default_pool()).run(JUDGE, CANDIDATE, code, payload))


def check_code_batch(
    examples: list[dict[str, Any]], responses: list[str], workers: int | None = None, pool: SandboxPool | None = None
) -> list[VerifyResult]:
    jobs = [_job(e, r) for e, r in zip(examples, responses, strict=True)]
    return [_to_result(r) for r in (pool or default_pool()).map(JUDGE, CANDIDATE, jobs, workers)]


# ---- the wire between judge and candidate: length-prefixed JSON ----

_MAX_MESSAGE = 64 << 20


def _send(sock, obj: Any) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def _recv(sock) -> Any:
    head = _recv_exact(sock, 4)
    if head is None:
        return None
    (n,) = struct.unpack(">I", head)
    if n > _MAX_MESSAGE:
        raise ValueError(f"message of {n} bytes")
    data = _recv_exact(sock, n)
    if data is None:
        raise EOFError("truncated message")
    return json.loads(data)


def _recv_exact(sock, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


_TAGS = {tuple: "t", set: "s", frozenset: "f"}
_UNTAG = {"t": tuple, "s": set, "f": frozenset}


def _encode(v: Any, refs: list | None) -> Any:
    """Plain data to JSON, exact types only (a subclass of int is not an int here); other objects become
    references into `refs` (the candidate's side) or are refused (the judge's side, refs=None)."""
    t = type(v)
    if v is None or t is bool or t is int or t is float or t is str:
        return v
    if t is list:
        return [_encode(x, refs) for x in v]
    if t in _TAGS:
        return {_TAGS[t]: [_encode(x, refs) for x in v]}
    if t is dict:
        return {"d": [[_encode(k, refs), _encode(x, refs)] for k, x in v.items()]}
    if t is bytes:
        return {"b": v.hex()}
    if t is complex:
        return {"c": [v.real, v.imag]}
    if t is _Ref:
        return {"r": v._id}
    if refs is None:
        raise TypeError(f"the tests pass a {t.__name__} to the candidate; only plain data crosses the sandbox")
    refs.append(v)
    return {"r": len(refs) - 1}


def _decode(v: Any, ref) -> Any:
    """JSON to plain data; `ref(i)` makes the object for reference i. Strict: anything unexpected raises."""
    t = type(v)
    if v is None or t is bool or t is int or t is float or t is str:
        return v
    if t is list:
        return [_decode(x, ref) for x in v]
    if t is dict and len(v) == 1:
        ((tag, x),) = v.items()
        if tag in _UNTAG and type(x) is list:
            return _UNTAG[tag](_decode(y, ref) for y in x)
        if tag == "d" and type(x) is list:
            return {_decode(k, ref): _decode(y, ref) for k, y in (_pair(p) for p in x)}
        if tag == "b" and type(x) is str:
            return bytes.fromhex(x)
        if tag == "c" and type(x) is list and len(x) == 2 and all(type(y) in (int, float) for y in x):
            return complex(x[0], x[1])
        if tag == "r" and type(x) is int:
            return ref(x)
    raise ValueError("not plain data")


def _pair(p: Any) -> list:
    if type(p) is not list or len(p) != 2:
        raise ValueError("bad dict item")
    return p


def _exception_name(e: BaseException) -> str:
    for cls in type(e).__mro__:
        if getattr(builtins, cls.__name__, None) is cls:
            return cls.__name__
    return "Exception"


# ---- the candidate's process ----

def serve_candidate(sock, code: str) -> None:
    """Run the candidate's code, then answer the judge's requests until it hangs up."""
    sys.set_int_max_str_digits(0)
    g: dict[str, Any] = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(code, "<solution>", "exec"), g)
    except BaseException as e:  # noqa: BLE001 - sys.exit() at top level fails the check too
        _send(sock, ["load_error", _exception_name(e), str(e)[:300]])
        return
    _send(sock, ["loaded"])
    refs: list[Any] = []
    while (msg := _recv(sock)) is not None:
        try:
            reply = _answer(msg, g, refs)
        except Exception as e:  # noqa: BLE001 - BaseException (sys.exit inside a call) ends this process
            reply = ["raise", _exception_name(e), str(e)[:300]]
        _send(sock, reply)


def _answer(msg: list, g: dict[str, Any], refs: list) -> list:
    ref = refs.__getitem__
    if msg[0] == "names":
        found = {}
        for name in msg[1]:
            if name in g:
                v = g[name]
                found[name] = ["module", v.__name__] if isinstance(v, types.ModuleType) else ["value", _encode(v, refs)]
        return ["names", found]
    if msg[0] == "call":
        args = _decode(msg[2], ref)
        kwargs = {k: v for k, v in _decode(msg[3], ref)}
        return ["ok", _encode(ref(msg[1])(*args, **kwargs), refs)]
    if msg[0] == "getattr":
        return ["ok", _encode(getattr(ref(msg[1]), msg[2]), refs)]
    raise ValueError(f"unknown request {msg[0]!r}")


# ---- the judge's process ----

class CandidateAbort(BaseException):
    """The candidate process died, exited or broke the protocol: the check has failed, whatever the tests do."""


class CandidateError(Exception):
    """An exception raised by the candidate that is not a builtin one."""


class _Ref:
    """A candidate's object seen from the judge: callable and with attributes, but not data. Its equality is
    identity and it has no truth value."""

    __slots__ = ("_remote", "_id")

    def __init__(self, remote: _Remote, i: int):
        self._remote, self._id = remote, i

    def __call__(self, *args, **kwargs):
        return self._remote.request(["call", self._id, _encode(list(args), None), _encode(list(kwargs.items()), None)])

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._remote.request(["getattr", self._id, name])

    def __bool__(self):
        raise TypeError("a candidate's object has no truth value here; return plain data")

    def __repr__(self) -> str:
        return f"<candidate object #{self._id}>"


class _Remote:
    def __init__(self, sock):
        self.sock, self.failure, self.calls, self._refs = sock, None, 0, {}

    def abort(self, why: str):
        self.failure = self.failure or why
        raise CandidateAbort(self.failure)

    def ref(self, i: int) -> _Ref:
        return self._refs.setdefault(i, _Ref(self, i))

    def receive(self) -> Any:
        try:
            msg = _recv(self.sock)
        except (OSError, ValueError, EOFError) as e:
            self.abort(f"the candidate broke the protocol ({e})")
        if msg is None:
            self.abort("the candidate's process ended during the tests")
        if type(msg) is not list or not msg or type(msg[0]) is not str:
            self.abort("the candidate broke the protocol")
        return msg

    def request(self, msg: list) -> Any:
        if self.failure:
            raise CandidateAbort(self.failure)
        self.calls += 1
        try:
            _send(self.sock, msg)
        except OSError:
            self.abort("the candidate's process ended during the tests")
        reply = self.receive()
        if reply[0] == "raise" and len(reply) == 3 and all(type(x) is str for x in reply[1:]):
            cls = getattr(builtins, reply[1], None)
            if isinstance(cls, type) and issubclass(cls, Exception):
                raise cls(reply[2])
            raise CandidateError(f"{reply[1]}: {reply[2]}")
        if reply[0] in ("ok", "names") and len(reply) == 2:
            try:
                return reply[1] if reply[0] == "names" else _decode(reply[1], self.ref)
            except (ValueError, TypeError, RecursionError) as e:  # unhashable keys, bad tags, too deep
                self.abort(f"the candidate returned something that is not plain data ({e})")
        self.abort("the candidate broke the protocol")

    def names(self, wanted: list[str]) -> dict[str, Any]:
        found = self.request(["names", wanted])
        out = {}
        for name, desc in (found.items() if type(found) is dict else ()):
            if name not in wanted or type(desc) is not list or len(desc) != 2:
                self.abort("the candidate broke the protocol")
            if desc[0] == "module" and type(desc[1]) is str:
                module = sys.modules.get(desc[1])
                if module is not None:
                    out[name] = module  # the judge's own copy of a module the code imported
            elif desc[0] == "value":
                try:
                    out[name] = _decode(desc[1], self.ref)
                except (ValueError, TypeError, RecursionError):
                    self.abort("the candidate broke the protocol")
        return out


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def judge(payload: dict[str, Any], sock) -> dict[str, Any]:
    """Run the tests against the candidate process on the other end of `sock`; the verdict as a dict."""
    sys.set_int_max_str_digits(0)
    remote, tests, entry = _Remote(sock), payload["tests"], payload.get("entry_point")
    try:
        hello = remote.receive()
        if hello[0] == "load_error":
            return _fail(f"running the code raised {hello[1]}: {hello[2]}"[:500])
        if hello != ["loaded"]:
            remote.abort("the candidate broke the protocol")
        code = compile(tests, "<tests>", "exec")
        wanted = sorted((_global_names(code) - set(dir(builtins))) | ({entry} if entry else set()))
        found = remote.names(wanted)
        if entry and entry not in found:
            return _fail(f"the code defines no `{entry}`")
        ns: dict[str, Any] = {**found, "__name__": "__tests__", "__builtins__": builtins}
        exec(code, ns)
        check = ns.get("check")
        if entry and isinstance(check, types.FunctionType) and check.__code__.co_filename == "<tests>":
            check(found[entry])
    except CandidateAbort:
        pass
    except BaseException as e:  # noqa: BLE001 - a failed assert, an exception, or the tests calling exit
        if not remote.failure:
            return _fail(_describe(e, tests))
    if remote.failure:
        return _fail(remote.failure)
    return {"passed": True, "reason": "all tests passed", "calls": remote.calls}


def _fail(reason: str) -> dict[str, Any]:
    return {"passed": False, "reason": reason}


def _describe(e: BaseException, tests: str) -> str:
    where = ""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "<tests>"]
    if frames:
        lines = tests.splitlines()
        n = frames[-1].lineno or 0
        text = lines[n - 1].strip() if 0 < n <= len(lines) else ""
        where = f" at tests line {n}" + (f": {text[:120]}" if text else "")
    msg = str(e)
    return f"{type(e).__name__}{where}" + (f" ({msg[:200]})" if msg else "")
