"""Configs that ship inside the packages, found by name, so an installed wheel runs them from any folder.

    videoalign fit --config toyworld/sft                 # lit_videoalign/configs/toyworld/sft.yaml
    videoalign fit --config builtin:toyworld/sft.yaml    # the same; builtin: never reads the working directory
    reward-zoo fit --config rewards/quality              # reward_zoo/configs/quality.yaml
    videoalign configs                                   # every shipped name, its method and its backbone

A ``--config`` value that is an existing file is that file. Otherwise it is a shipped name: ``configs/`` in front
(the repository's paths, ``configs/toyworld/sft.yaml``) and a ``.yaml`` ending may be given or left out. A name
that is neither ends the command with one line naming it and the closest shipped names.

This module imports only the standard library, PyYAML and :mod:`lit_videoalign.errors`, so the reward zoo uses it
without importing the training suite.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lit_videoalign.errors import UsageError

BUILTIN = "builtin:"
CONFIG_FLAGS = ("--config", "-c")
#: name prefix -> folder of shipped YAML files (searched recursively): the suite's configs by ``family/name``
SUITE_CONFIGS: dict[str, Path] = {"": Path(__file__).resolve().parent / "configs"}


def list_configs(roots: Mapping[str, Path] = SUITE_CONFIGS) -> list[str]:
    """Every shipped config name under ``roots`` (``{prefix: folder}``), sorted: ``["toyworld/dmd", ...]``."""
    names = []
    for prefix, folder in roots.items():
        names += [prefix + p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml")]
    return sorted(names)


def _normalise(name: str) -> str:
    """``builtin:configs/toyworld/sft.yaml`` -> ``toyworld/sft``."""
    name = name.removeprefix(BUILTIN).replace("\\", "/").removeprefix("./").removeprefix("configs/")
    for suffix in (".yaml", ".yml"):
        name = name.removesuffix(suffix)
    return name


def config_path(name: str, roots: Mapping[str, Path] = SUITE_CONFIGS, command: str = "videoalign") -> Path:
    """The shipped file of config ``name`` (``toyworld/sft``, ``builtin:toyworld/sft.yaml``,
    ``configs/toyworld/sft.yaml``).

    Raises:
        UsageError: no shipped config has that name; the message names the closest ones.
    """
    wanted = _normalise(name)
    for prefix, folder in roots.items():
        if wanted.startswith(prefix) and (path := folder / f"{wanted.removeprefix(prefix)}.yaml").is_file():
            return path
    known = list_configs(roots)
    close = difflib.get_close_matches(wanted, known, n=3, cutoff=0.5)
    more = " ..." if len(known) > 8 else ""
    hint = f"closest: {', '.join(close)}" if close else f"shipped: {', '.join(known[:8])}{more}"
    where = "" if name.startswith(BUILTIN) else "no such file, and "
    raise UsageError(f"config {name!r}: {where}no shipped config of that name ({hint}; `{command} configs` lists "
                     f"them all)")


def _is_inline(value: str) -> bool:
    """Whether a ``--config`` value is YAML/JSON text rather than a path or name (jsonargparse accepts both)."""
    return not value.startswith(BUILTIN) and any(c in value for c in "{}:\n ")


def resolve_config_args(argv: list[str], roots: Mapping[str, Path] = SUITE_CONFIGS,
                        command: str = "videoalign") -> list[str]:
    """``argv`` with every ``--config NAME``/``--config=NAME``/``-c NAME`` that is not an existing file (or that says
    ``builtin:``) replaced by the shipped file's path; everything else unchanged."""
    out = list(argv)

    def resolved(value: str) -> str:
        if _is_inline(value) or (not value.startswith(BUILTIN) and Path(value).exists()):
            return value
        return str(config_path(value, roots, command))

    for i, arg in enumerate(out):
        if arg in CONFIG_FLAGS and i + 1 < len(out):
            out[i + 1] = resolved(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolved(arg.split("=", 1)[1])
    return out


def describe_config(path: Path) -> tuple[str, str]:
    """``(method class, backbone or reward)`` of a config file, read from its ``model:`` section (``"?"`` where
    absent): the class name of ``model.class_path`` and the backbone's ``pretrained_model_name_or_path`` (for a
    reward-training config, the reward's class name); for a reward spec (a top-level ``class_path``), the reward's
    class name and checkpoint."""
    import yaml

    config = yaml.safe_load(path.read_text()) or {}
    if "class_path" in config and "model" not in config:  # a reward spec (reward-zoo serve --reward FILE)
        source = (config.get("init_args") or {}).get("pretrained_model_name_or_path", "reward spec")
        return str(config["class_path"]).rsplit(".", 1)[-1], str(source)
    model = config.get("model") or {}
    init = model.get("init_args") or {}
    method = str(model.get("class_path", "?")).rsplit(".", 1)[-1]
    backbone = init.get("backbone") or {}
    if isinstance(backbone, Mapping) and backbone:
        source = (backbone.get("init_args") or {}).get("pretrained_model_name_or_path", "?")
    elif isinstance(init.get("reward"), Mapping):
        source = "reward " + str(init["reward"].get("class_path", "?")).rsplit(".", 1)[-1]
    else:
        source = "?"
    return method, str(source)


def print_configs(roots: Mapping[str, Path] = SUITE_CONFIGS) -> None:
    """Print every shipped config: name, method class and backbone (or reward), one per line, in aligned columns."""
    rows = []
    for name in list_configs(roots):
        prefix = next(p for p in sorted(roots, key=len, reverse=True) if name.startswith(p))
        rows.append((name, *describe_config(roots[prefix] / f"{name.removeprefix(prefix)}.yaml")))
    widths = [max((len(r[k]) for r in rows), default=0) for k in range(2)]
    for name, method, source in rows:
        print(f"{name:{widths[0]}}  {method:{widths[1]}}  {source}")


def cli_builder(cli_class: Callable[..., Any], roots: Mapping[str, Path] = SUITE_CONFIGS,
                command: str = "videoalign") -> Callable[[list[str] | None], Any]:
    """What a console script's ``main`` hands to :func:`lit_videoalign.errors.run_cli`: builds ``cli_class`` (a
    LightningCLI) from an argument list (None: ``sys.argv``) with shipped config names resolved
    (:func:`resolve_config_args`), or, for ``COMMAND configs``, prints the shipped configs instead."""

    def build(argv: list[str] | None) -> Any:
        given = sys.argv[1:] if argv is None else list(argv)
        if given[:1] == ["configs"]:
            if given[1:] in (["-h"], ["--help"]):
                print(f"usage: {command} configs\n\nList the shipped configs (name, method, backbone); run one from "
                      f"any folder with --config NAME.")
                return None
            if given[1:]:
                raise UsageError(f"`{command} configs` lists the shipped configs and takes no arguments, got "
                                 f"{' '.join(given[1:])!r}")
            print_configs(roots)
            return None
        resolved = resolve_config_args(given, roots, command)
        if argv is None:  # the console script: LightningCLI reads sys.argv (passing args too would warn)
            sys.argv[1:] = resolved
            return cli_class(args=None, parser_kwargs={"exit_on_error": False})
        return cli_class(args=resolved, parser_kwargs={"exit_on_error": False})

    return build
