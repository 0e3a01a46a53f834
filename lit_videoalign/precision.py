"""Precision check: bf16 on a CPU without bf16 hardware, said before the first step instead of a silent crawl.

CPUs with AVX512_BF16 or AMX (x86) or the Arm BF16 extension multiply bf16 in hardware; the others emulate it, and a
bf16 matmul then runs tens of times slower than float32 (measured 108x on an AVX2-only code path, 256x256, one
thread), so a real-model config meant for GPUs (``precision: bf16-true``) may not finish one step on such a machine.
:func:`check_bf16_on_cpu` looks up the CPU flags, times one small bf16 and float32 matmul (well under a second) and
warns once, in one line, with the measured slowdown and how to switch to float32.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

BF16_PRECISIONS = ("bf16", "bf16-mixed", "bf16-true")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 ``flags`` (AVX512_BF16, AMX); Arm ``Features`` (BF16)
SLOW = 2.0  # where the flags cannot be read, a measured slowdown above this counts as "no bf16 hardware"
_warned: set[str] = set()
_READ = object()  # "read the CPU flags" (None already means "unknown")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The feature flags the kernel reports for the first CPU (x86 ``flags``, Arm ``Features``); None where there is
    no such file (not Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        return None
    return None


def bf16_matmul_slowdown(size: int = 256, repeats: int = 3, budget_s: float = 0.5) -> float:
    """How many times slower a ``size x size`` bf16 matmul runs than a float32 one on this CPU (best of ``repeats``
    after a warm-up; fewer repeats once ``budget_s`` seconds are spent)."""
    def best_time(dtype: torch.dtype) -> float:
        a = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(dtype)  # (size, size)
        torch.mm(a, a)  # warm-up: kernel selection, allocation
        best, start = float("inf"), time.perf_counter()
        for _ in range(repeats):
            tic = time.perf_counter()
            torch.mm(a, a)
            best = min(best, time.perf_counter() - tic)
            if time.perf_counter() - start > budget_s / 2:
                break
        return best

    return best_time(torch.bfloat16) / max(best_time(torch.float32), 1e-9)


def check_bf16_on_cpu(precision: str | None, device_type: str, bf16_weights: bool = False, *,
                      flags: Iterable[str] | None | object = _READ,
                      measure: Callable[[], float] | None = None) -> str | None:
    """The one-line warning for a bf16 run on a CPU without native bf16, or None when there is nothing to say.

    Args:
        precision: the Trainer's precision (``"bf16-mixed"``, ``"32-true"``, ...).
        device_type: where the run computes (``"cpu"``, ``"cuda"``, ...); only ``"cpu"`` is checked.
        bf16_weights: the model holds bfloat16 weights (a backbone loaded with ``torch_dtype: bfloat16``), which
            compute in bf16 whatever the precision says.
        flags: the CPU feature flags (default: :func:`cpu_flags`); None when unknown, and then the measured slowdown
            decides.
        measure: returns the bf16/float32 matmul time ratio (default: :func:`bf16_matmul_slowdown`).
    """
    if device_type != "cpu" or (precision not in BF16_PRECISIONS and not bf16_weights):
        return None
    flags = cpu_flags() if flags is _READ else flags
    native = None if flags is None else any(flag in set(flags) for flag in BF16_CPU_FLAGS)
    if native:
        return None
    slowdown = (measure or bf16_matmul_slowdown)()
    if native is None and slowdown < SLOW:
        return None
    what = f"precision {precision}" if precision in BF16_PRECISIONS else "bfloat16 model weights"
    switch = "--trainer.precision 32-true" + (" and the backbone's torch_dtype/frozen_dtype float32" if bf16_weights
                                              else "")
    cpu = "a CPU without native bf16 (no AVX512_BF16, AMX or Arm BF16)" if native is False else "this CPU"
    return (f"{what} on {cpu}: a bf16 matmul runs {slowdown:.0f}x slower than float32 here, so a step may take many "
            f"times longer; bf16 is meant for GPUs, pass {switch} to train in float32")


def warn_if_slow_bf16(trainer, model: torch.nn.Module | None = None) -> str | None:
    """Warn once per process (rank zero) when ``trainer`` would run bf16 on a CPU without bf16 hardware; called by
    ``videoalign fit`` before the first step. Returns the warning, or None."""
    from lightning.pytorch.utilities import rank_zero_warn

    bf16_weights = model is not None and any(p.dtype == torch.bfloat16 for p in model.parameters())
    message = check_bf16_on_cpu(str(trainer.precision), trainer.strategy.root_device.type, bf16_weights)
    if message is None or message.split(":")[0] in _warned:
        return None
    _warned.add(message.split(":")[0])
    rank_zero_warn(message)
    return message
