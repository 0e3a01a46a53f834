"""Benchmarks of lit-videoalign: ``python -m benchmarks`` runs them all (see ``benchmarks/__main__.py``)."""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the finite values (NaN where there are too few)."""
    v = [x for x in values if math.isfinite(x)]
    mean = math.fsum(v) / len(v) if v else float("nan")
    if len(v) < 2:
        return mean, float("nan")
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in v) / (len(v) - 1) / len(v))


def add_output_argument(parser: argparse.ArgumentParser, default: str | Path) -> None:
    """The one output flag of every benchmark: ``--output OUTPUT`` writes ``OUTPUT.json`` and ``OUTPUT.md`` (figures
    and GIFs beside them, named after ``OUTPUT``). ``--out DIR``, the folder flag some benchmarks had, keeps working for
    one release (see :func:`output_path`)."""
    parser.add_argument("--output", default=str(default), help="OUTPUT.json and OUTPUT.md (figures beside them)")
    parser.add_argument("--out", default=None, metavar="DIR", help="deprecated: --output DIR/NAME")


def output_path(args: argparse.Namespace, name: str | None = None) -> Path:
    """Where a benchmark writes (without suffix): ``--output``; with the deprecated ``--out DIR`` or a deprecated
    per-benchmark file name ``name`` (``toyworld_distill --name``), ``DIR/NAME`` (``DIR``: ``--out``, else the folder
    of ``--output``; ``NAME``: ``name``, else the file name of ``--output``), with a warning."""
    if args.out is None and name is None:
        return Path(args.output)
    out = (Path(args.out) if args.out is not None else Path(args.output).parent) / (name or Path(args.output).name)
    warnings.warn(f"--out DIR and --name NAME are deprecated; use --output {out}", FutureWarning, stacklevel=2)
    return out


def write_result(result: dict, output: str | Path, markdown: Callable[[dict], str]) -> dict:
    """Write ``result`` as ``OUTPUT.json`` and its table as ``OUTPUT.md`` (any suffix of ``output`` is replaced),
    print the table, and return ``result``."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print(table)
    return result


PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident memory of this process now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler:
    """A thread that keeps the highest resident memory of this process since the last :meth:`reset`: finer than
    ``VmHWM`` when one phase of a run (a step, after building the model) is what is measured."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval, self.peak, self._stop = interval, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def reset(self) -> int:
        """Start a new phase; returns the resident memory now."""
        self.peak = rss_bytes()
        return self.peak

    def read(self) -> int:
        """The peak of the current phase so far."""
        self.peak = max(self.peak, rss_bytes())
        return self.peak

    def stop(self) -> int:
        """Stop sampling; returns the peak of the current phase."""
        self._stop.set()
        self._thread.join()
        return self.read()
