"""The pinned, tested stack: write ``requirements/lock.txt`` from an environment, or check an environment against it.

``make install`` installs exactly the lock and then runs ``check``, so a fresh machine gets what CI tested or stops
with the packages that differ. ``make lock`` resolves the newest stack ``pyproject.toml`` allows in a scratch venv,
runs the tests there and only then calls ``write``.

    python requirements/lockfile.py write requirements/lock.txt    # from the running interpreter's environment
    python requirements/lockfile.py check requirements/lock.txt    # exit 1 naming every difference
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
from importlib import metadata
from pathlib import Path

# Wheels that exist only for Linux x86-64 (torch's CUDA runtime): pinned with a marker, so the lock still installs
# elsewhere (where torch brings what its own wheel needs).
PLATFORM_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
MARKER = 'sys_platform == "linux" and platform_machine == "x86_64"'
PROJECT = "lit-videoalign"  # the editable install itself is not pinned


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """``{canonical name: version}`` of every distribution in this environment but the project itself."""
    found = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    found.pop(PROJECT, None)
    return found


def read_lock(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` of the lock's lines that apply to this platform."""
    pins = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        spec, _, marker = line.partition(";")
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s]+)", spec.strip())
        if match is None:
            raise SystemExit(f"error: {path}:{number}: expected 'name==version', got {raw!r}")
        if marker.strip() and not (sys.platform == "linux" and platform.machine() == "x86_64"):
            continue
        pins[canonical(match[1])] = match[2]
    return pins


def write(path: Path) -> None:
    lines = [
        "# The stack `make test` and CI run on, installed exactly by `make install`; refreshed by `make lock`, which",
        "# resolves the newest versions pyproject.toml allows, runs the test suite on them and only then writes here.",
        f"# Written on CPython {platform.python_version()}, {sys.platform} {platform.machine()}.",
    ]
    for name, version in sorted(installed().items()):
        marker = f" ; {MARKER}" if PLATFORM_ONLY.match(name) else ""
        lines.append(f"{name}=={version}{marker}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    print(f"wrote {len(lines) - 3} pins to {path}")


def check(path: Path) -> int:
    want, have = read_lock(path), installed()
    problems = [f"{n}: locked {v}, installed {have.get(n, 'nothing')}" for n, v in sorted(want.items())
                if have.get(n) != v]
    problems += [f"{n}: installed {v}, not in the lock" for n, v in sorted(have.items()) if n not in want]
    if problems:
        print(f"error: this environment differs from {path} in {len(problems)} package(s) "
              f"(remove .venv and run `make install` again):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"environment matches {path} ({len(want)} packages)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["write", "check"])
    parser.add_argument("lock", type=Path)
    args = parser.parse_args()
    if args.command == "write":
        write(args.lock)
        return 0
    return check(args.lock)


if __name__ == "__main__":
    sys.exit(main())
