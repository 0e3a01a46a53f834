"""Errors a user can read: the one-line messages of ``videoalign`` and ``reward-zoo``, and helpers for messages.

Both command lines run through :func:`run_cli`. Our own validation errors (a ``ValueError``/``TypeError`` raised by
this package, a jsonargparse config that does not validate, a missing file, a video that does not decode, an offline
Hub, a full disk) end the program with one line ``error: ...`` on stderr: status 2 for command-line and config
errors, 1 for the rest. Anything else is unexpected and keeps its traceback, and ``--traceback`` (or
``VIDEOALIGN_DEBUG=1``) shows the full stack of every error.

This module imports only the standard library (the Hub helper imports ``huggingface_hub`` when called), so
``reward_zoo`` may use it without importing the training suite.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PACKAGES = ("lit_videoalign", "reward_zoo")
USAGE, FAILURE = 2, 1  # exit statuses: a wrong command line or config, anything else
TRACEBACK_FLAG = "--traceback"
DEBUG_ENV = "VIDEOALIGN_DEBUG"
_EXIT_ATTR = "_videoalign_exit_status"


class UsageError(ValueError):
    """A command-line argument or config value is wrong; the command line exits with status 2."""


# -- message helpers ---------------------------------------------------------------------------------------------
def shorten(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters with an ellipsis and the full length, for quoting long values
    (a 10,000-character prompt) in messages: ``'a red ball falls and…' (10000 characters)``."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(value)
    cut = text[:limit].rstrip() + "…"
    return f"{cut!r} ({len(text)} characters)" if isinstance(value, str) else f"{cut} ({len(text)} characters)"


def nearest(name: str, valid: list[str] | tuple[str, ...] | set[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest valid name, or ``""``."""
    close = difflib.get_close_matches(name, sorted(valid), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"PK\x03\x04", "a ZIP archive"), (b"%PDF", "a PDF document"))


def file_kind(path: str | os.PathLike) -> str | None:
    """What a file is from its first bytes, when that explains why it is not the video or checkpoint it should be:
    ``"an empty file (0 bytes)"``, ``"a PNG image"``, ``"a text file"``, ...; None when nothing is recognised."""
    try:
        if os.path.getsize(path) == 0:
            return "an empty file (0 bytes)"
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return "a text file" if all(c.isprintable() or c in "\t\r\n" for c in text) else None


def hub_offline_error(repo_id: str, what: str = "Hub repository") -> FileNotFoundError:
    """The error for a Hub id that is not in the local cache while the Hub is offline (or unreachable), naming the
    two ways out: huggingface_hub's ``LocalEntryNotFoundError`` (a ``FileNotFoundError``) with a message that says what
    to do. Raise it ``from`` the ``LocalEntryNotFoundError`` / ``OfflineModeIsEnabled`` that huggingface_hub raised."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    why = ("the Hugging Face Hub is offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE
           else "the Hugging Face Hub cannot be reached")
    return LocalEntryNotFoundError(f"cannot find the requested files in the local cache for {what} {repo_id!r}, and "
                                   f"{why}: download it first (hf download {repo_id}, with HF_HUB_OFFLINE=0 once) or "
                                   "pass a local folder")


# -- classifying an exception ------------------------------------------------------------------------------------
_ROOTS = {"lit_videoalign": Path(__file__).resolve().parent, "reward_zoo": Path(__file__).resolve().parent.parent /
          "reward_zoo"}


def _raised_in(err: BaseException) -> str:
    """The module of the frame that raised ``err`` (a package's own name when it runs as ``python -m``)."""
    tb = err.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    if module == "__main__":
        file = Path(tb.tb_frame.f_code.co_filename).resolve()
        module = next((name for name, root in _ROOTS.items() if file.is_relative_to(root)), module)
    return module


def _from(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _is_ours(err: BaseException) -> bool:
    """Raised on purpose by this project: its own exception classes, or a validation error raised by its code."""
    if _from(type(err).__module__, *PACKAGES):
        return True
    return _from(_raised_in(err), *PACKAGES) and isinstance(err, (ValueError, TypeError, KeyError, OSError,
                                                                   FloatingPointError))


def _is_readable(err: BaseException) -> bool:
    """Foreign errors whose message is enough: files (OSError: missing, unreadable, disk full; Hub errors are
    OSErrors too), undecodable videos (PyAV) and Lightning's misconfiguration errors."""
    return (isinstance(err, OSError) or _from(type(err).__module__, "av")
            or type(err).__name__ == "MisconfigurationException")


def _config_wrapper(err: BaseException) -> bool:
    return _from(_raised_in(err), "jsonargparse")


def mark_usage(err: BaseException) -> None:
    """Record that ``err`` comes from the command line or config (the CLI exits with status 2)."""
    try:
        setattr(err, _EXIT_ATTR, USAGE)
    except AttributeError:
        pass


@contextmanager
def config_phase() -> Iterator[None]:
    """Mark every exception leaving the block as a command-line or config error (exit status 2)."""
    try:
        yield
    except Exception as err:
        mark_usage(err)
        raise


def _message(err: BaseException) -> str:
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]
    elif isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT) and not _is_ours(err):
        where = f" while writing {err.filename}" if err.filename else ""
        text = f"no space left on device{where} ({err.strerror or err})"
    elif isinstance(err, OSError) and err.strerror and _is_ours(err):
        text = err.strerror if not err.filename or str(err.filename) in err.strerror \
            else f"{err.strerror}: {err.filename}"
    else:
        text = str(err) or type(err).__name__
    return one_line(text)


def one_line(text: str, limit: int = 4000) -> str:
    """``text`` on one line: lines joined and quoted values over 80 characters shortened (:func:`shorten`)."""
    text = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    text = re.sub(r"(?<!\w)'((?:[^'\\]|\\.){81,}?)'(?!\w)", lambda m: shorten(m.group(1)), text)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def describe(err: BaseException) -> tuple[str, int] | None:
    """``(one-line message, exit status)`` for an error the user can act on, None for an unexpected one.

    A config that jsonargparse could not instantiate is described by its innermost cause (the project's own
    message, not "Does not validate against any of the Union subtypes").
    """
    status = getattr(err, _EXIT_ATTR, FAILURE)
    if isinstance(err, argparse.ArgumentError):
        return condense_config_error(str(err)), USAGE
    inner: BaseException | None = err
    while inner is not None and _config_wrapper(inner):
        inner = inner.__cause__ or inner.__context__
    if inner is None:  # jsonargparse's own message, nothing under it
        return condense_config_error(str(err)), USAGE
    if isinstance(inner, UsageError):
        status = USAGE
    if not (_is_ours(inner) or _is_readable(inner)):
        return None
    return _message(inner), status


# -- jsonargparse messages ---------------------------------------------------------------------------------------
_KEY = re.compile(r'^Parser key "([^"]+)"(?: element (\d+))?:\s*(.*)$')
_CLASS = re.compile(r"^Problem with given class_path '([^']+)':\s*(.*)$")
_EXPECTED = re.compile(r"^Expected a <class '([^']+)'>\.?(?: Got value: (.*))?$")
_UNION = "Does not validate against any of the Union subtypes"


def _dedent(lines: list[str]) -> list[str]:
    lines = [line for line in lines if line.strip()]
    width = min((len(line) - len(line.lstrip()) for line in lines), default=0)
    return [line[width:] for line in lines]


def _type_name(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _union(lines: list[str]) -> tuple[list[str], str]:
    """Condense a "Does not validate against any of the Union subtypes" block (the lines after that sentence)."""
    items: list[list[str]] = []
    given, in_errors = None, False
    for line in _dedent(lines):
        if line.startswith("Errors:"):
            in_errors = True
        elif line.startswith("Given value:"):
            given, in_errors = line[len("Given value:"):].strip(), False
        elif line.startswith(("Given value type:", "Subtypes:")):
            in_errors = False
        elif in_errors and line.lstrip().startswith("- ") and (not items or len(line) - len(line.lstrip()) <=
                                                              len(items[0][0]) - len(items[0][0].lstrip())):
            items.append([line])
        elif in_errors and items:
            items[-1].append(line)
    items = [[item[0].replace("- ", "", 1), *item[1:]] for item in items]
    items = [item for item in items if item[0].strip() != "Expected a <class 'NoneType'>"]
    expected = [m.group(1) for item in items if len(item) == 1 and (m := _EXPECTED.match(item[0].strip()))]
    if items and len(expected) == len(items):
        return [], f"expected {' or '.join(_type_name(e) for e in expected)}, got {given!r}"
    if not items:
        return [], f"got {given}"
    nested = [item for item in items if len(item) > 1 or not _EXPECTED.match(item[0].strip())]
    return _block(_dedent(nested[0]))


def _block(lines: list[str]) -> tuple[list[str], str]:
    """``(key path, message)`` of a jsonargparse error block."""
    first, rest = lines[0].strip(), lines[1:]
    if m := _KEY.match(first):
        keys, text = _block([m.group(3), *rest] if m.group(3) else _dedent(rest))
        return [m.group(1) + (f"[{m.group(2)}]" if m.group(2) else ""), *keys], text
    if m := _CLASS.match(first):
        class_path = m.group(1)
        keys, text = _block([m.group(2), *rest] if m.group(2) else _dedent(rest))
        if "has no attribute" in text or "No module named" in text:
            return ["class_path"], f"cannot import {class_path!r}: {text}"
        if o := re.match(r"^Option '([^']+)' is not accepted$", text):
            text = f"{_type_name(class_path)} has no argument {o.group(1)!r}{_nearest_argument(class_path, o[1])}"
        return ["init_args", *keys], text
    if first == _UNION:
        return _union(rest)
    if m := _EXPECTED.match(first):
        got = m.group(2)
        if got is None:
            got = next((line.split(":", 1)[1].strip() for line in rest if line.strip().startswith("Given value:")), "")
        return [], f"expected {_type_name(m.group(1))}, got {got!r}"
    return [], " ".join(line.strip() for line in lines if line.strip())


def _nearest_argument(class_path: str, name: str) -> str:
    module, _, attr = class_path.rpartition(".")
    cls = getattr(sys.modules.get(module), attr, None)  # imported by jsonargparse already; nothing new is imported
    params: set[str] = set()
    for klass in getattr(cls, "__mro__", ()):  # a subclass taking (*args, **kwargs) passes its base's arguments on
        try:
            found = inspect.signature(klass.__init__).parameters.values()
        except (TypeError, ValueError):
            continue
        params |= {p.name for p in found if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return nearest(name, params)


def condense_config_error(message: str, config: str | None = None) -> str:
    """jsonargparse's nested message (unions of subtypes, class paths, keys) as one line: the config key, what was
    expected and what was given, e.g. ``model.init_args.lora_rank: expected int, got 'eight'``."""
    lines = [line for line in message.splitlines() if line.strip()]
    if not lines:
        return "invalid command line"
    if lines[0].startswith("Problems parsing config"):
        text = one_line(message)
        return text.replace('"<unicode string>"', repr(config)) if config else text
    keys, text = _block(lines)
    return one_line(f"{'.'.join(keys)}: {text}" if keys else text)


# -- the command-line entry ----------------------------------------------------------------------------------------
def run_cli(build: Callable[[list[str] | None], Any], args: list[str] | None = None,
            exit_on_error: bool | None = None) -> Any:
    """Run a command line ``build(args)`` (a LightningCLI) with one-line errors.

    Args:
        build: builds and runs the CLI from an argument list (None: ``sys.argv``).
        args: the arguments; None reads ``sys.argv`` (the console script).
        exit_on_error: turn the errors :func:`describe` knows into ``error: ...`` and ``SystemExit`` (2 for command
            line and config, 1 otherwise); default: only for the console script (``args`` None), so Python callers
            get the exception. Errors parsing the command line always exit, as argparse does.

    ``--traceback`` anywhere in the arguments (it is removed before parsing) or ``VIDEOALIGN_DEBUG=1`` lets every
    exception through with its traceback.
    """
    argv = list(sys.argv[1:] if args is None else args)
    debug = TRACEBACK_FLAG in argv or os.environ.get(DEBUG_ENV, "0").lower() not in ("", "0", "false", "no")
    if TRACEBACK_FLAG in argv:
        argv = [a for a in argv if a != TRACEBACK_FLAG]
        if args is None:
            sys.argv[1:] = argv
    if exit_on_error is None:
        exit_on_error = args is None
    try:
        return build(None if args is None else argv)
    except Exception as err:
        if debug:
            raise
        if isinstance(err, argparse.ArgumentError):
            _exit(condense_config_error(str(err), _config_file(argv)), USAGE)
        found = describe(err) if exit_on_error else None
        if found is None:
            raise
        _exit(*found)


def _config_file(argv: list[str]) -> str | None:
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-c", "--config")]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    return str(Path(files[-1])) if len(files) == 1 else None


def _exit(message: str, status: int) -> None:
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)
