"""Inside of the code sandbox (see :mod:`tracerl.rewards.sandbox` for the threat model).

Never imported by the host and never executed from disk: the host reads this text once
and runs it as ``python -I -S -c <text> <candidate_fd> <judge_fd> <result_fd>`` (inside
fresh namespaces), so a program cannot patch the harness that grades later programs.
Standard library only.

One process starts (PID 1 of the sandbox's PID namespace, root) and, before any untrusted
code exists:
1. reads the *candidate* payload (program text, limits, uids; nothing secret);
2. builds the file-system view: a read-only minimal root (interpreter, standard library,
   shared libraries), a private ``/proc`` (``hidepid=2``), a private ``/dev``, a size-
   bounded private ``/tmp``; ``pivot_root`` into it, the host's tree detached;
3. forks. The child becomes the **candidate**: it closes every descriptor except its RPC
   pipes, takes the resource limits, drops to its own unprivileged uid with no
   capabilities, sets ``no_new_privs``, installs the seccomp filter and only then runs
   the program, then answers calls (function mode) or exits (stdio mode).
   The parent becomes the **judge**: only now it reads the *judge* payload (the tests,
   trusted helper code), drops to another uid, becomes non-dumpable, installs the filter
   and runs the tests in its own interpreter, where the candidate's functions are proxies
   (:class:`Remote`) that ship plain data (``None``, bools, numbers, strings, bytes and
   lists/tuples/dicts/sets of them) over a pipe. The judge alone holds the result
   descriptor; when it exits, the kernel kills everything left in the namespace.

``weaken`` (tests only) switches single protections off to show that the adversarial
tests can fail; see ``sandbox._WEAKEN``.
"""

import marshal
import os
import sys

MAX_MSG = 1 << 20
_PASS, _ERR, _DONE = b"pass %d\n", b"program_error\n", b"done\n"

# --------------------------------------------------------------------------- plain data
# A small codec instead of json (its import costs more than the rest of the start-up):
# N, T, F; I<hex>; ; D<float.hex>; ; C<re>;<im>; ; S<n>:<utf-8> ; B<n>:<bytes> ;
# L/U/E/Z<n>: items (list, tuple, set, frozenset) ; M<n>: key value ... ; R<key> (a ref).
# The decoder builds plain Python values only; anything malformed raises ValueError.

_SEQ = {list: b"L", tuple: b"U", set: b"E", frozenset: b"Z"}


def _noref(v):
    raise TypeError(f"not plain data: {type(v).__name__}")


def dumps(v, ref=_noref):
    out = []
    _dump(v, ref, out, 0)
    return b"".join(out)


def _dump(v, ref, out, depth):
    if depth > 100:
        raise ValueError("nested too deeply")
    t = type(v)
    if v is None or v is True or v is False:
        out.append(b"N" if v is None else b"T" if v else b"F")
    elif t is int:
        out.append(b"I%x;" % v)
    elif t is float:
        out.append(b"D%s;" % v.hex().encode())
    elif t is complex:
        out.append(b"C%s;%s;" % (v.real.hex().encode(), v.imag.hex().encode()))
    elif t is str or t is bytes:
        data = v.encode("utf-8", "surrogatepass") if t is str else v
        out.append(b"%s%d:" % (b"S" if t is str else b"B", len(data)))
        out.append(data)
    elif t in _SEQ:
        out.append(b"%s%d:" % (_SEQ[t], len(v)))
        for x in v:
            _dump(x, ref, out, depth + 1)
    elif t is dict:
        out.append(b"M%d:" % len(v))
        for k, x in v.items():
            _dump(k, ref, out, depth + 1)
            _dump(x, ref, out, depth + 1)
    else:
        out.append(b"R")
        _dump(ref(v), _noref, out, depth + 1)


def loads(b, ref=_noref):
    v, i = _load(b, 0, ref, 0)
    if i != len(b):
        raise ValueError("trailing data")
    return v


def _field(b, i, end):
    j = b.index(end, i)
    return b[i:j], j + 1


def _count(b, i):
    n, i = _field(b, i, b":")
    if not n.isdigit() or len(n) > 9:
        raise ValueError("bad count")
    return int(n), i


def _load(b, i, ref, depth):
    if depth > 100:
        raise ValueError("nested too deeply")
    t = b[i:i + 1]
    i += 1
    if t in (b"N", b"T", b"F"):
        return (None if t == b"N" else t == b"T"), i
    if t == b"I":
        x, i = _field(b, i, b";")
        return int(x, 16), i
    if t == b"D":
        x, i = _field(b, i, b";")
        return float.fromhex(x.decode("ascii")), i
    if t == b"C":
        re_, i = _field(b, i, b";")
        im, i = _field(b, i, b";")
        return complex(float.fromhex(re_.decode("ascii")), float.fromhex(im.decode("ascii"))), i
    if t in (b"S", b"B"):
        n, i = _count(b, i)
        data = b[i:i + n]
        if len(data) != n:
            raise ValueError("truncated")
        return (data.decode("utf-8", "surrogatepass") if t == b"S" else bytes(data)), i + n
    if t in (b"L", b"U", b"E", b"Z"):
        n, i = _count(b, i)
        items = []
        for _ in range(n):
            x, i = _load(b, i, ref, depth + 1)
            items.append(x)
        kind = {b"L": list, b"U": tuple, b"E": set, b"Z": frozenset}[t]
        return (items if kind is list else kind(items)), i
    if t == b"M":
        n, i = _count(b, i)
        out = {}
        for _ in range(n):
            k, i = _load(b, i, ref, depth + 1)
            x, i = _load(b, i, ref, depth + 1)
            out[k] = x
        return out, i
    if t == b"R":
        k, i = _load(b, i, _noref, depth + 1)
        if type(k) not in (int, str):
            raise ValueError("bad reference")
        return ref(k), i
    raise ValueError("bad tag")


def send(fd, data):
    data = len(data).to_bytes(4, "big") + data
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd, n):
    chunks, got = [], 0
    while got < n:
        b = os.read(fd, min(n - got, 1 << 16))
        if not b:
            raise EOFError
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def recv(fd):
    n = int.from_bytes(_read_exact(fd, 4), "big")
    if n > MAX_MSG:
        raise ValueError("message too large")
    return _read_exact(fd, n)


def read_payload(fd):
    """A host payload (trusted: written by the grader, ``marshal`` format)."""
    chunks = []
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(fd)
    return marshal.loads(b"".join(chunks))


# --------------------------------------------------------------------------- kernel


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _mount(src, dst, fstype, flags, data=None):
    ctypes, libc = _libc()
    e = lambda s: None if s is None else s.encode()  # noqa: E731
    if libc.mount(e(src), e(dst), e(fstype), flags, e(data)) != 0:
        raise OSError(ctypes.get_errno(), f"mount {src} on {dst}")


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18


def build_root(p):
    """Mount the sandbox's file-system view and pivot into it (root, private mount ns)."""
    weaken = p["weaken"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    if "host_root" in weaken:  # test knob: the host's tree stays visible
        if "host_proc" not in weaken:
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
        return p["workdir"]
    new = p["root"]
    _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for path in p["ro_binds"]:
        dst = new + path
        if os.path.isdir(path):
            os.makedirs(dst, 0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), 0o755, exist_ok=True)
            open(dst, "w").close()
        _mount(path, dst, None, MS_BIND | MS_REC)
        _mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for link, target in p["links"]:
        os.makedirs(os.path.dirname(new + link), 0o755, exist_ok=True)
        os.symlink(target, new + link)
    os.mkdir(new + "/dev", 0o755)
    for dev in ("null", "zero", "random", "urandom"):
        open(f"{new}/dev/{dev}", "w").close()
        _mount(f"/dev/{dev}", f"{new}/dev/{dev}", None, MS_BIND)
    os.mkdir(new + "/proc", 0o555)
    if "host_proc" in weaken:  # test knob: the host's /proc
        _mount("/proc", new + "/proc", None, MS_BIND | MS_REC)
    else:
        _mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    for d in ("/tmp", "/dev/shm"):
        os.mkdir(new + d, 0o1777)
        if "tmpfs" in weaken:  # test knob: the host's shared folders
            _mount(d, new + d, None, MS_BIND)
        else:
            _mount("tmpfs", new + d, "tmpfs", MS_NOSUID | MS_NODEV,
                   f"size={p['limits']['fsize_mb']}m,mode=1777")
    ctypes, libc = _libc()
    os.chdir(new)
    if libc.syscall(p["pivot_root_nr"], b".", b".") != 0:
        raise OSError(ctypes.get_errno(), "pivot_root")
    if libc.umount2(b".", 2) != 0:  # MNT_DETACH: the host's tree is gone from this view
        raise OSError(ctypes.get_errno(), "umount old root")
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    work = "/tmp/work" if "tmpfs" not in weaken else "/tmp/tracerl-work-" + os.urandom(6).hex()
    os.mkdir(work, 0o700)
    return work


def seccomp(p):
    """no_new_privs + the host-built BPF filter (``p["bpf"]``, hex)."""
    if not p["bpf"] or "seccomp" in p["weaken"]:
        return
    ctypes, libc = _libc()
    prog = bytes.fromhex(p["bpf"])

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(prog)
    fp = Fprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "no_new_privs")
    if libc.prctl(22, 2, ctypes.byref(fp), 0, 0) != 0:  # PR_SET_SECCOMP, MODE_FILTER
        raise OSError(ctypes.get_errno(), "seccomp")


def limits(p):
    if "rlimits" in p["weaken"]:
        return
    import resource

    lim = p["limits"]
    for which, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_AS, lim["memory_mb"] << 20),
                         (resource.RLIMIT_FSIZE, lim["fsize_mb"] << 20),
                         (resource.RLIMIT_NOFILE, lim["nofile"]),
                         (resource.RLIMIT_NPROC, lim["nproc"])):
        resource.setrlimit(which, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))


def drop(uid):
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)  # from root: every capability goes with it


# --------------------------------------------------------------------------- candidate


def confine(p, work):
    """Limits, the program's own uid (no capabilities), its folder, the seccomp filter."""
    limits(p)
    if p["uid_candidate"] is not None and "uid" not in p["weaken"]:
        os.chown(work, p["uid_candidate"], p["uid_candidate"])
        drop(p["uid_candidate"])
    os.chdir(work)
    seccomp(p)


def candidate(p, fds, work):
    """Child: confine itself, run the program, then serve calls. Never returns."""
    status = 1
    try:
        low = 3
        for fd in sorted(fds):  # every descriptor but 0-2 and the RPC pipes
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 1 << 16)
        confine(p, work)
        os.environ.clear()
        os.environ.update(p["env"], HOME=work, TMPDIR=work)
        code, mode = p["code"], p["mode"]
        del p
        status = run_program(code, mode, fds)
    except BaseException:  # the harness's own failure (or the judge went away)
        import traceback

        traceback.print_exc()
    finally:
        os._exit(status)


def _module_ns(name):
    """A real module for the program (so that pickle, e.g. multiprocessing, finds its
    functions), registered under ``name``."""
    import builtins
    import types

    mod = types.ModuleType(name)
    mod.__builtins__ = builtins
    sys.modules[name] = mod
    return mod.__dict__


def run_program(code, mode, fds):
    if mode == "stdio":
        ns = _module_ns("__main__")
        status = 0
        try:
            exec(compile(code, "<program>", "exec"), ns)
        except SystemExit as e:  # an explicit exit is judged by its code
            status = 0 if e.code in (None, 0) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
            status = 1
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            status = 1
        return status
    req, rep = fds
    ns = _module_ns("__sandbox__")
    try:
        exec(compile(code, "<program>", "exec"), ns)
    except BaseException as e:  # SystemExit included: an exiting program passes nothing
        send(rep, dumps(("program_error", type(e).__name__)))
        return 0
    objs = []

    def ref(v):
        objs.append(v)
        return len(objs) - 1

    names, modules = {}, {}
    for k, v in list(ns.items()):
        if k.startswith("__"):
            continue
        if type(v).__name__ == "module":
            if type(getattr(v, "__name__", None)) is str:
                modules[k] = v.__name__
            continue
        if callable(v):
            names[k] = v
        else:
            try:
                if len(dumps(v)) < 1 << 16:
                    names[k] = v
            except (ValueError, TypeError, RecursionError):
                pass
    by_name = {id(v): k for k, v in names.items() if callable(v)}
    send(rep, dumps(("ready", names, modules), lambda v: by_name[id(v)]))
    get = lambda k: objs[k] if type(k) is int else ns[k]  # noqa: E731
    while True:
        try:
            msg = loads(recv(req), get)
        except EOFError:  # the judge is done
            return 0
        try:
            op, obj, a, b = msg
            if op == "call":
                v = obj(*a, **b)
            elif op == "getattr":
                v = getattr(obj, a)
            else:  # "list": iterate (generators, custom iterables), bounded
                v = []
                for x in obj:
                    v.append(x)
                    if len(v) > 100_000:
                        raise ValueError("iterable too long")
            out = dumps(("ok", v), ref)
        except BaseException as e:  # noqa: BLE001 - reported to the judge as a raise
            try:
                name, text = type(e).__name__, str(e)[:2000]
            except BaseException:
                name, text = "Exception", ""
            out = dumps(("raise", name if type(name) is str else "Exception",
                         text if type(text) is str else ""))
        send(rep, out)


# --------------------------------------------------------------------------- judge


class CandidateGone(BaseException):
    """The candidate died or broke the protocol: every test from here on fails."""


class CandidateError(Exception):
    """A non-builtin exception raised by the candidate."""


def judge(p, j, rfd, fds):
    """Parent: read the tests only now, run them against proxies, report the verdict."""
    import builtins

    drop(p["uid_judge"])
    os.chdir("/")
    _, libc = _libc()
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no ptrace, no /proc/<pid>/mem
    seccomp(p)
    req, rep = fds
    state = {"dead": False}

    def call(msg):
        if state["dead"]:
            raise CandidateGone
        try:
            send(req, msg)
            r = loads(recv(rep), Remote)
            if type(r) is tuple and len(r) == 2 and r[0] == "ok":
                return r[1]
            if type(r) is not tuple or len(r) != 3 or r[0] != "raise":
                raise ValueError("bad reply")
            _, name, text = r
            if type(name) is not str or type(text) is not str:
                raise ValueError("bad reply")
        except (OSError, EOFError, ValueError, TypeError, KeyError, RecursionError):
            state["dead"] = True
            raise CandidateGone from None
        cls = getattr(builtins, name, None)
        # StopIteration would silently end a map()/iterator in the test: never re-raised
        if (isinstance(cls, type) and issubclass(cls, Exception)
                and not issubclass(cls, StopIteration | StopAsyncIteration)):
            try:
                exc = cls(text)
            except Exception:  # noqa: BLE001
                exc = CandidateError(f"{name}: {text}")
            raise exc
        raise CandidateError(f"{name}: {text}")

    class Remote:
        """A candidate object seen from the judge: calls, attributes and iteration go over
        the pipe; only plain data (or another Remote) comes back."""

        __slots__ = ("_ref",)

        def __init__(self, ref):
            object.__setattr__(self, "_ref", ref)

        def __call__(self, *args, **kwargs):
            return call(dumps(("call", self, args, kwargs), _arg))

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return call(dumps(("getattr", self, name, None), _arg))

        def __iter__(self):
            return iter(call(dumps(("list", self, None, None), _arg)))

        def __repr__(self):
            return f"<candidate object {self._ref!r}>"

        def _opaque(self, *_):
            raise TypeError("a candidate object that is not plain data has no truth value "
                            "and no equality")

        __bool__ = __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __len__ = _opaque
        __hash__ = object.__hash__

    def _arg(v):
        if type(v) is Remote:
            return v._ref
        raise TypeError(f"cannot pass {type(v).__name__} to the candidate")

    try:
        first = loads(recv(rep), Remote)
        ok = type(first) is tuple and len(first) == 3 and first[0] == "ready"
        names, modules = first[1:] if ok else (None, None)
    except (OSError, EOFError, ValueError, TypeError, KeyError, RecursionError):
        names = modules = None
    if type(names) is not dict or type(modules) is not dict:
        os.write(rfd, _ERR)
        return
    ns = {"__name__": "__judge__", "__builtins__": builtins}
    if j.get("trusted"):
        try:
            exec(compile(j["trusted"], "<trusted>", "exec"), ns)
        except BaseException:  # noqa: BLE001 - a broken prefix only loses its helpers
            ns = {"__name__": "__judge__", "__builtins__": builtins}
    entry = j.get("entry_point")
    for k, v in names.items():
        if type(k) is str and (k == entry or (k not in ns and not hasattr(builtins, k))):
            ns[k] = v
    if entry and entry in ns and entry not in names:
        del ns[entry]  # the stub from the prompt is not the answer
    for k, mod in modules.items():  # "import math" in the program: the judge's own math
        if (type(k) is str and type(mod) is str and k not in ns and not hasattr(builtins, k)
                and mod.partition(".")[0] in sys.stdlib_module_names
                and mod not in ("antigravity", "this")):
            try:
                __import__(mod)
                ns[k] = sys.modules[mod]
            except Exception:  # noqa: BLE001 - a test that needs it fails by itself
                pass
    for i, src in enumerate(j["tests"]):
        ok = True
        try:
            exec(compile(src, f"<test {i}>", "exec"), ns)
        except BaseException:  # noqa: BLE001
            ok = False
        if state["dead"]:  # a test that swallowed the candidate's death passes nothing
            break
        if ok:
            os.write(rfd, _PASS % i)
    os.write(rfd, _DONE)


def shared_interpreter(p, j, rfd, work):
    """Test knob ``fork``: program and tests in one interpreter, verdict fd reachable
    (the design this module replaces); shows the verdict-forgery attack can succeed."""
    import builtins

    confine(p, work)
    ns = {"__name__": "__sandbox__", "__builtins__": builtins}
    try:
        exec(compile(p["code"], "<program>", "exec"), ns)
    except BaseException:  # noqa: BLE001
        os.write(rfd, _ERR)
        return
    for i, src in enumerate(j["tests"]):
        try:
            exec(compile(src, f"<test {i}>", "exec"), ns)
        except BaseException:  # noqa: BLE001
            continue
        os.write(rfd, _PASS % i)
    os.write(rfd, _DONE)


# --------------------------------------------------------------------------- main


def main():
    cfd, jfd, rfd = (int(a) for a in sys.argv[1:4])
    p = read_payload(cfd)
    work = build_root(p) if p["mounts"] else p["workdir"]
    if "fork" in p["weaken"]:
        shared_interpreter(p, read_payload(jfd), rfd, work)
        os._exit(0)
    function = p["mode"] == "function"
    if function:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
    child = os.fork()
    if child == 0:  # the candidate: nothing secret has been read yet
        candidate(p, (req_r, rep_w) if function else (), work)
    if function:
        os.close(req_r)
        os.close(rep_w)
        j = read_payload(jfd)
        try:
            judge(p, j, rfd, (req_w, rep_r))
        except BaseException:  # the harness's own failure: no verdict, shown on stderr
            import traceback

            traceback.print_exc()
        finally:
            os._exit(0)
    os.close(jfd)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    os.write(rfd, b"exit %d\n" % code)
    os._exit(0)


if __name__ == "__main__":  # run as ``python -I -S -c <this text>``; importing does nothing
    main()
