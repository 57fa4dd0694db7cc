"""A full disk while a stage writes its outputs says so, naming the file, in every form it
surfaces in (OSError ENOSPC, safetensors/polars 'os error 28', torch.save's 'unexpected
pos'); the partial output is removed and nothing counts as done."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tracerl.pipeline.artifacts import DiskFullError, is_complete, is_disk_full, stage_output

# the messages measured on a full tmpfs (torch 2.13, safetensors, polars)
TORCH = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
SAFETENSORS = "Error while serializing: I/O error: No space left on device (os error 28)"
POLARS = ("parquet: File out of specification: underlying IO error: No space left on device "
          "(os error 28)")


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != "params.yaml")


@pytest.mark.parametrize("error", [
    RuntimeError(TORCH),
    RuntimeError("[enforce fail at inline_container.cc:593] . PytorchStreamWriter failed "
                 "writing file data/1: file write failed"),
    ValueError(SAFETENSORS),
    RuntimeError(POLARS),
])
def test_a_library_writer_that_hits_a_full_disk_names_the_file(tmp_path, error):
    out = tmp_path / "sft"
    with pytest.raises(DiskFullError) as e:
        with stage_output(out, stage="sft") as o:
            (o.dir / "checkpoint").mkdir()
            (o.dir / "checkpoint" / "model.pt").write_bytes(b"partial")  # the writer's file
            raise error
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC and e.value.__cause__ is error
    assert f"no space left on device while writing {out / 'checkpoint' / 'model.pt'} " in msg
    assert "(stage sft)" in msg and "MiB free there now" in msg
    assert ("unexpected pos" in msg) == ("unexpected pos" in str(error))
    assert not is_complete(out) and _leftovers(out) == []  # no temp folder left behind


def _full_for(name: str):
    """``Path.write_text`` that hits a full disk when it writes a file called ``name``."""
    real = Path.write_text

    def write_text(self, *a, **k):
        if self.name == name:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *a, **k)

    return write_text


def test_oserror_enospc_names_its_own_file(tmp_path, monkeypatch):
    out = tmp_path / "rollout"
    monkeypatch.setattr(Path, "write_text", _full_for("rollouts.parquet"))
    with pytest.raises(DiskFullError) as e:
        with stage_output(out, stage="rollout") as o:
            (o.dir / "trajectory.html").write_text("<html>")
            (o.dir / "rollouts.parquet").write_text("rows")
    assert str(e.value).startswith(f"no space left on device while writing {out}/rollouts.parquet")
    assert e.value.filename == str(out / "rollouts.parquet")
    assert not is_complete(out) and _leftovers(out) == []


def test_a_full_disk_while_finishing_is_reported_too(tmp_path, monkeypatch):
    out = tmp_path / "reward"
    with pytest.raises(DiskFullError, match=r"while writing \S*metrics.json"):
        with stage_output(out, stage="reward") as o:
            (o.dir / "scored.parquet").write_text("rows")
            monkeypatch.setattr(Path, "write_text", _full_for("metrics.json"))
    assert not is_complete(out) and _leftovers(out) == []


def test_other_errors_pass_unchanged(tmp_path):
    out = tmp_path / "policy"
    with pytest.raises(ValueError, match="^bad rows$"):
        with stage_output(out, stage="policy"):
            raise ValueError("bad rows")
    assert _leftovers(out) == []
    assert not is_disk_full(RuntimeError("CUDA out of memory"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    wrapped = RuntimeError("saving the checkpoint failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(wrapped)
