"""Where tensors live: the run's device and dtype, and the host side of the data path.

One rule for every stage: the model, every batch, the sampler's tensors and generators
and the optimizer state live on ``run.device`` (the model's device); rows, records and
their bookkeeping (trajectory tensors, GAE, advantages) live on the host (:data:`HOST`),
created with an explicit device, so that torch's default device (``torch.set_default_device``)
never decides where a tensor goes. ``tests/test_devices.py`` runs an SFT step, a policy
update, a value update and a rollout with the default device set to ``meta`` to hold
every code path to this rule. A batch crosses from host to device once per micro-batch
(:meth:`tracerl.rl.rows.Batch.to`); masks are built on the device from it.

Dtype (``model.dtype``): the parameter dtype. ``float32`` weights, optionally with bf16
autocast in a training stage (``sft.bf16``, ``policy.bf16``, ``value.bf16``: matmuls in
bf16, fp32 weights, gradients and optimizer state); or ``bfloat16`` weights (half the
memory of weights and gradients), trained against fp32 master weights and fp32 AdamW
moments kept by :class:`tracerl.rl.trainer.Trainer` (the mixed-precision scheme of
DeepSpeed's bf16 mode). Log-softmax of the trainer and the sampler runs in fp32 either way.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

HOST = torch.device("cpu")
"""The device of rows, records and their bookkeeping."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""``model.dtype`` names -> torch dtypes (float16 is excluded: about 1 GFLOP/s on CPU and
no loss scaling here)."""

DEVICE_TYPES = ("cpu", "cuda", "mps")

F = TypeVar("F", bound=Callable)

log = logging.getLogger(__name__)

FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags with native bf16 matmuls. Without them torch emulates bf16 on the CPU: on an
AMD EPYC with AVX2 only, 2 threads ran 1.3 GFLOP/s in bf16 against 48 in fp32
(docs/benchmarks.md)."""


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s), or ``""`` where it is not known."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return ""


def cpu_has_fast_bf16() -> bool | None:
    """Whether this CPU has native bf16 matmuls (None: unknown, e.g. not Linux)."""
    info = _cpuinfo()
    if not info:
        return None
    flags = set()
    for line in info.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(f in flags for f in FAST_BF16_FLAGS)


def warn_slow_bf16(what: str, device: torch.device) -> None:
    """Log a warning when ``what`` asks for bf16 on a CPU that only emulates it."""
    if torch.device(device).type == "cpu" and cpu_has_fast_bf16() is False:
        log.warning("%s: bf16 on this CPU (%s) has no native bf16 matmuls (%s); torch "
                    "emulates them, tens of times slower than float32. Use float32 here.",
                    what, cpu_model() or "unknown", " / ".join(FAST_BF16_FLAGS))


class DeviceError(ValueError):
    """``run.device`` / ``model.dtype`` cannot run here; the message says what to set."""


def device_name_problem(name: str) -> str | None:
    """Why ``name`` is not a device tracerl runs on, on any machine (None: it is one).
    Checked when params load; whether this machine has it is :func:`device_problem`'s.

    Example:
        >>> device_name_problem("cuda:1") is None, device_name_problem("gpu0") is not None
        (True, True)
    """
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        return (f"run.device {name!r} is not a device name torch knows; use one of "
                f"{', '.join(DEVICE_TYPES)} (optionally with an index, e.g. cuda:1)")
    if dev.type not in DEVICE_TYPES:
        return f"run.device {name!r}: tracerl runs on {', '.join(DEVICE_TYPES)}, not {dev.type}"
    return None


def device_problem(name: str) -> str | None:
    """Why ``name`` is not a usable device on this machine (None: it is)."""
    if (problem := device_name_problem(name)) is not None:
        return problem
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return (f"run.device is {name!r} but CUDA is not available here (torch "
                    f"{torch.__version__}, CUDA build {torch.version.cuda}); set run.device: cpu "
                    "or run on a machine with a GPU and a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return (f"run.device is {name!r} but this machine has "
                    f"{torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        return f"run.device is {name!r} but MPS is not available here; set run.device: cpu"
    return None


def resolve_device(name: str | torch.device) -> torch.device:
    """``run.device`` as a :class:`torch.device`, checked before any work.

    Raises:
        DeviceError: unknown device name, or a device this machine does not have.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if (problem := device_problem(name)) is not None:
        raise DeviceError(problem)
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype, device: str | torch.device = HOST) -> torch.dtype:
    """``model.dtype`` as a torch dtype that ``device`` can run.

    Raises:
        DeviceError: an unknown dtype, or bf16 on a GPU without bf16 support.
    """
    dtype = name if isinstance(name, torch.dtype) else DTYPES.get(name)
    if dtype not in DTYPES.values():
        raise DeviceError(f"model.dtype {name!r} is not one of {', '.join(DTYPES)}")
    dev = torch.device(device)
    if dtype == torch.bfloat16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"model.dtype bfloat16: the GPU of {dev} does not support bf16; "
                          "use model.dtype: float32")
    if dtype == torch.bfloat16:
        warn_slow_bf16("model.dtype bfloat16", dev)
    return dtype


def on_host(fn: F) -> F:
    """Run ``fn`` with :data:`HOST` as the default device: for functions that build rows
    and records (host-side data) from Python values, so that a caller's default device
    (``torch.set_default_device``) cannot move them."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.device(HOST):
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]
