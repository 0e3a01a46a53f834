"""Launch a test module's ``worker`` as ``world`` local gloo processes (what torchrun would do), for the sharding and
context-parallel tests: each rank runs ``python SCRIPT OUT PIPELINE`` with the rendezvous variables set, and a rank
that fails or hangs fails the test with the ranks' log tails."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: str, out: Path, pipeline: str, world: int, timeout: float) -> Path:
    """Run ``script``'s workers on ``world`` ranks writing into ``out``; returns ``out`` once every rank exited 0."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "NODE_RANK": "0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, script, str(out), pipeline], cwd=ROOT,
                              env={**env, "LOCAL_RANK": str(r), "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return out
