"""Child side of the code sandbox (see :mod:`tracerl.rewards.sandbox`).

This file is never imported by the host and never executed from disk: the host reads
its text once and runs it as ``python -I -c <text> <payload_fd>``, so a program cannot
patch the harness that grades later programs. It uses the standard library only.

Order of operations (trusted code first, then untrusted code):
1. read the JSON payload from ``payload_fd`` and close it;
2. when root inside fresh namespaces: private tmpfs over the world-writable folders,
   a fresh working folder there, the interpreter's files bind-mounted read-only where
   an unprivileged user could not reach them;
3. resource limits (CPU, address space, file size, open files, processes, no core);
4. drop to an unprivileged uid/gid (root only), no_new_privs;
5. block ``socket``/``ctypes`` at import level (defence in depth; the network namespace
   is the real barrier), guard ``sys.settrace``/``setprofile`` against jump tricks;
6. run the program, then each test. A ``stmt`` test passes only when its statement
   returned normally; the harness then writes ``<nonce> pass <i>`` to the result fd that
   the host opened. An ``expr`` test (the left side of ``assert <expr> == <literal>``)
   reports ``<nonce> value <i> <repr>`` and the host, which alone knows the expected
   literal, compares. Stdout is never read for function tests.
"""

import json
import os
import sys


def _init_reaper():
    """As PID 1 of a fresh PID namespace, fork: the program must not be the namespace's
    init (the kernel shields init from signals, including the RLIMIT_CPU kill). PID 1
    only reaps; when it exits, the kernel kills every process left in the namespace."""
    if os.getpid() != 1:
        return
    child = os.fork()
    if child == 0:
        return
    for fd in range(3, 256):
        try:
            os.close(fd)
        except OSError:
            pass
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(1)
        if pid == child:
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _main():  # noqa: C901 - one linear script, kept in one function so names stay local
    _init_reaper()
    payload_fd = int(sys.argv[1])
    chunks = []
    while True:
        b = os.read(payload_fd, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(payload_fd)
    p = json.loads(b"".join(chunks).decode("utf-8"))
    del chunks
    rfd = p["result_fd"]
    os.set_inheritable(rfd, False)
    nonce = p["nonce"].encode()
    lim = p["limits"]

    # 2. filesystem view (only possible as root inside a private mount namespace)
    if p["isolate_fs"]:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        ms_rdonly, ms_remount, ms_bind, ms_rec = 1, 32, 4096, 16384

        def mount(src, dst, fstype, flags, data):
            if libc.mount(src, dst.encode(), fstype, flags, data) != 0:
                raise OSError(ctypes.get_errno(), f"mount {dst}")

        mount(b"tmpfs", "/tmp", b"tmpfs", 0, b"size=%dm,mode=1777" % lim["fsize_mb"])
        for d in ("/var/tmp", "/dev/shm", "/run/lock"):
            if os.path.isdir(d):
                try:
                    mount(b"tmpfs", d, b"tmpfs", 0, b"size=1m,mode=1777")
                except OSError:
                    pass
        # expose interpreter trees that an unprivileged uid cannot traverse (e.g. /root/...)
        remap = {}
        for i, root in enumerate(p["expose"]):
            dst = f"/tmp/.rt{i}"
            os.mkdir(dst, 0o755)
            mount(root.encode(), dst, None, ms_bind | ms_rec, None)
            mount(None, dst, None, ms_remount | ms_bind | ms_rdonly, None)
            remap[root] = dst
        if remap:
            new = []
            for e in sys.path:
                for root, dst in remap.items():
                    if e == root or e.startswith(root + "/"):
                        e = dst + e[len(root):]
                        break
                new.append(e)
            sys.path[:] = new
            sys.path_importer_cache.clear()
            for mod in list(sys.modules.values()):  # packages imported before the mount
                paths = getattr(mod, "__path__", None)
                if isinstance(paths, list):
                    for j, e in enumerate(paths):
                        for root, dst in remap.items():
                            if e == root or e.startswith(root + "/"):
                                paths[j] = dst + e[len(root):]
        work = "/tmp/work"
        os.mkdir(work, 0o700)
        if p["uid"] is not None:
            os.chown(work, p["uid"], p["uid"])
        os.chdir(work)
        del libc, ctypes
        sys.modules.pop("ctypes", None)
    else:
        os.chdir(p["workdir"])

    # 3. resource limits
    import resource

    def setlim(which, value):
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass

    setlim(resource.RLIMIT_CORE, 0)
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
    except (ValueError, OSError):
        pass
    setlim(resource.RLIMIT_AS, lim["memory_mb"] << 20)
    setlim(resource.RLIMIT_FSIZE, lim["fsize_mb"] << 20)
    setlim(resource.RLIMIT_NOFILE, lim["nofile"])
    setlim(resource.RLIMIT_NPROC, p["nproc"])

    # 4. privileges
    if p["uid"] is not None:
        os.setgroups([])
        os.setgid(p["uid"])
        os.setuid(p["uid"])
    try:
        import ctypes as _c

        _c.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        del _c
    except Exception:
        pass
    sys.modules.pop("ctypes", None)
    os.environ.clear()
    os.environ.update(p["env"])
    os.environ["HOME"] = os.environ["TMPDIR"] = os.getcwd()

    # 5. defence in depth inside the interpreter
    import builtins
    import socket

    def _no_network(*a, **k):
        raise OSError("network access is disabled in the tracerl sandbox")

    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
        if hasattr(socket, name):
            setattr(socket, name, _no_network)
    try:
        import _socket

        _socket.socket = _no_network
    except ImportError:
        pass
    for mod in ("ctypes", "_ctypes"):
        sys.modules[mod] = None
    tampered = []

    def _guard(*a, **k):
        tampered.append(1)

    real_settrace, real_setprofile = sys.settrace, sys.setprofile
    sys.settrace = sys.setprofile = _guard
    import threading

    threading.settrace = threading.setprofile = _guard

    # keep private references: the program may rebind the public names
    _exec, _eval, _compile, _write, _exit = exec, eval, compile, os.write, os._exit
    _base = BaseException
    _gettrace, _getprofile = sys.gettrace, sys.getprofile
    _flush_out = sys.stdout.flush
    _flush_err = sys.stderr.flush

    def clean():
        return not tampered and _gettrace() is None and _getprofile() is None

    code = p["code"]
    tests = p["tests"]
    mode = p["mode"]
    del p
    real_settrace(None)
    real_setprofile(None)

    # 6. untrusted code
    if mode == "stdio":
        ns = {"__name__": "__main__", "__builtins__": builtins}
        status = 0
        try:
            _exec(_compile(code, "<program>", "exec"), ns)
        except SystemExit as e:  # an explicit exit is judged by its code
            status = 0 if e.code in (None, 0) else 1
        except _base:
            import traceback

            traceback.print_exc()
            status = 1
        try:
            _flush_out()
            _flush_err()
        except _base:
            status = 1
        if clean():
            _write(rfd, nonce + b" exit %d\n" % status)
        _exit(status)

    ns = {"__name__": "__sandbox__", "__builtins__": builtins}
    try:
        _exec(_compile(code, "<program>", "exec"), ns)
    except _base:  # SystemExit included: an exiting program passes nothing
        _write(rfd, nonce + b" program_error\n")
        _exit(0)
    _repr, _str, _len = repr, str, len
    for i, t in enumerate(tests):
        if not clean():
            break
        kind, src = t
        try:
            if kind == "expr":  # the host holds the expected value and compares
                v = _eval(_compile(src, f"<test {i}>", "eval"), ns)
                r = _repr(v)
                if type(r) is not _str or _len(r) > 100_000:
                    continue
                r = r.encode("utf-8", "replace")
            else:
                _exec(_compile(src, f"<test {i}>", "exec"), ns)
        except _base:
            continue
        if not clean():
            break
        if kind == "expr":
            _write(rfd, nonce + b" value %d " % i + r.replace(b"\n", b" ") + b"\n")
        else:  # recorded only after the statement ran to completion
            _write(rfd, nonce + b" pass %d\n" % i)
    _write(rfd, nonce + b" done\n")
    _exit(0)


if __name__ == "__main__":  # run as ``python -I -c <this text>``; importing does nothing
    _main()
