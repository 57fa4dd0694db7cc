"""Stage outputs that are never half-written.

A stage writes into ``<out>.tmp-<pid>/``; on success the folder is renamed to ``<out>``
and ``manifest.json`` (files with sizes and sha256, metrics, params digest, timing) is
written last. A folder without a manifest is an unfinished stage: a resumed run starts
at the first stage whose output has no manifest (see :func:`is_complete`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
METRICS = "metrics.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_complete(out_dir: str | os.PathLike) -> bool:
    """True when ``out_dir`` holds a manifest, i.e. the stage finished."""
    return (Path(out_dir) / MANIFEST).is_file()


def verify_outputs(out_dir: str | os.PathLike) -> list[str]:
    """What differs between a finished folder and its manifest: each listed file must
    exist with the recorded size and sha256 (sizes first: a cheap check that catches
    truncation; hashes always, since a flipped byte keeps the size). Empty when intact."""
    out = Path(out_dir)
    try:
        files = read_manifest(out)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{out / MANIFEST}: unreadable ({e})"]
    found = []
    for rel, rec in files.items():
        f = out / rel
        if not f.is_file():
            found.append(f"{f}: missing (the manifest lists {rec['bytes']} bytes)")
        elif f.stat().st_size != rec["bytes"]:
            found.append(f"{f}: {f.stat().st_size} bytes, the manifest says {rec['bytes']}")
        elif sha256_file(f) != rec["sha256"]:
            found.append(f"{f}: content differs from the manifest (sha256 "
                         f"{rec['sha256'][:12]}...)")
    return found


def files_digest(files: dict[str, str]) -> str:
    """A short digest of ``{relative path: sha256}`` (a checkpoint's identity)."""
    text = json.dumps(sorted(files.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def folder_digest(folder: str | os.PathLike) -> str:
    """:func:`files_digest` of every file under ``folder``, hashed from disk now."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): sha256_file(p)
             for p in sorted(folder.rglob("*")) if p.is_file()}
    if not files:
        raise FileNotFoundError(f"{folder}: no files to digest (not a checkpoint folder?)")
    return files_digest(files)


def manifest_digest(out_dir: str | os.PathLike, sub: str) -> str:
    """:func:`folder_digest` of ``out_dir/sub`` as the finished stage's manifest recorded
    it (no file is read but the manifest): what a later stage expects to find there."""
    files = read_manifest(out_dir).get("files", {})
    prefix = sub.rstrip("/") + "/"
    mine = {k.removeprefix(prefix): v["sha256"] for k, v in files.items()
            if k.startswith(prefix)}
    if not mine:
        raise FileNotFoundError(f"{Path(out_dir) / MANIFEST} lists no file under {sub}/")
    return files_digest(mine)


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(out_dir) / MANIFEST).read_text())


def read_metrics(out_dir: str | os.PathLike) -> dict[str, Any]:
    p = Path(out_dir) / METRICS
    return json.loads(p.read_text()) if p.exists() else {}


class StageOutput:
    """Handle given to a stage body: ``.dir`` to write into, ``.metrics`` to fill.
    ``.main``: this process writes the outputs (False on the other ranks of a multi-rank
    stage, :func:`tracerl.pipeline.stage_cli.rank_output`)."""

    def __init__(self, tmp: Path, main: bool = True):
        self.dir = tmp
        self.main = main
        self.metrics: dict[str, Any] = {}
        self.info: dict[str, Any] = {}


@contextlib.contextmanager
def stage_output(out_dir: str | os.PathLike, *, stage: str, extra: dict | None = None,
                 overwrite: bool = True) -> Iterator[StageOutput]:
    """Context manager: write a stage's outputs atomically, manifest last.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()) / "reward"
        >>> with stage_output(d, stage="reward") as out:
        ...     _ = (out.dir / "x.txt").write_text("hi")
        ...     out.metrics["accuracy"] = 0.5
        >>> is_complete(d), read_metrics(d)["accuracy"]
        (True, 0.5)
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    t0 = time.time()
    handle = StageOutput(tmp)
    try:
        yield handle
    except BaseException as e:
        _raise_disk_full(e, tmp, out, stage)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _finish(tmp, out, handle, stage=stage, t0=t0, extra=extra, overwrite=overwrite)
    except Exception as e:
        _raise_disk_full(e, tmp if tmp.exists() else out, out, stage)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finish(tmp: Path, out: Path, handle: StageOutput, *, stage: str, t0: float,
            extra: dict | None, overwrite: bool) -> None:
    """Metrics, file hashes, rename into place, manifest last."""
    (tmp / METRICS).write_text(json.dumps(handle.metrics, indent=2, sort_keys=True, default=float))
    files = {
        str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(tmp.rglob("*")) if p.is_file()
    }
    if out.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
        shutil.rmtree(out)
    os.replace(tmp, out)
    from tracerl.pipeline.stage_cli import params_checks, params_reads

    manifest = {
        "stage": stage,
        "params_read": params_reads(stage),
        "params_checked": params_checks(stage),
        "started": t0,
        "seconds": time.time() - t0,
        "files": files,
        "metrics": handle.metrics,
        **handle.info,
        **(extra or {}),
    }
    mtmp = out / f".{MANIFEST}.tmp"
    mtmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(mtmp, out / MANIFEST)


# --------------------------------------------------------------------------- disk full
# A full disk surfaces in several forms: OSError ENOSPC/EDQUOT (Python's own writes),
# "No space left on device (os error 28)" inside safetensors' and polars' errors, and
# torch.save's "[enforce fail at inline_container.cc] . unexpected pos N vs M" or
# "PytorchStreamWriter failed writing file ...: file write failed", which never say why
# (measured with torch 2.13 on a full tmpfs).
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded",
                   "unexpected pos", "file write failed")


class DiskFullError(OSError):
    """A stage ran out of disk space while writing its outputs (``errno`` ENOSPC)."""

    def __str__(self) -> str:
        return str(self.strerror)


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it was raised from) says the disk is full."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e).lower() for t in _DISK_FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _raise_disk_full(e: BaseException, folder: Path, out: Path, stage: str) -> None:
    """Re-raise a disk-full error as :class:`DiskFullError` naming the file (the one it
    names, else the newest in ``folder``) by its place in ``out``; the partial output is
    removed first."""
    if not isinstance(e, Exception) or isinstance(e, DiskFullError) or not is_disk_full(e):
        return
    name = getattr(e, "filename", None)
    if not name and folder.is_dir():
        files = [p for p in folder.rglob("*") if p.is_file()]
        name = max(files, key=lambda p: p.stat().st_mtime_ns) if files else folder
    name = Path(name or folder)
    if name.is_relative_to(folder):
        name = out / name.relative_to(folder)
    if folder != out:  # the temp folder: nothing in it is kept
        shutil.rmtree(folder, ignore_errors=True)
    free = shutil.disk_usage(folder.parent).free / 2**20
    torch_note = (" (torch.save reports a full disk as 'unexpected pos ...')"
                  if "unexpected pos" in str(e) else "")
    raise DiskFullError(
        errno.ENOSPC,
        f"no space left on device while writing {name} (stage {stage}){torch_note}; "
        f"{free:.0f} MiB free there now: free some space and re-run (finished stages are "
        f"kept)", str(name)) from e
