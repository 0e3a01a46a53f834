"""The base of both command lines, ``videoalign`` and ``reward-zoo``: LightningCLI with method subcommands.

:class:`MethodSubcommandsCLI` adds subcommands that are methods of the CLI class, checks ``--ckpt_path`` against the
config's model class before any state is touched, and removes the folders of a Trainer subcommand that fails before
its first optimizer step. ``--model NAME`` takes the short name of any subclass of the model class, in every
subcommand (:func:`expand_model_names`). It imports no objective, data module or command of the suite (the suite's
CLI names its objective package in :attr:`MethodSubcommandsCLI.model_packages`), so the reward zoo can build on it
alone.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
import shutil
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lit_videoalign import errors
from lit_videoalign.checkpoint_io import check_model_class, check_state_dict, read_checkpoint
from lit_videoalign.errors import UsageError


def new_run_folders(trainer: L.Trainer) -> dict[Path, Path]:
    """The folders a run would create that do not exist yet (the loggers' ``version_N``, the callbacks' ``dirpath`` for
    checkpoints and exports, the root's default ``checkpoints/``), each mapped to its nearest existing ancestor."""
    candidates = [getattr(logger, "log_dir", None) for logger in trainer.loggers]
    candidates += [getattr(cb, "dirpath", None) for cb in trainer.callbacks]
    candidates.append(Path(trainer.default_root_dir) / "checkpoints")
    folders = {}
    for candidate in candidates:
        if (isinstance(candidate, (str, os.PathLike)) and candidate and "://" not in str(candidate)
                and not (path := Path(candidate).absolute()).exists()):
            folders[path] = next(p for p in path.parents if p.exists())
    return folders


def remove_run_folders(folders: dict[Path, Path]) -> None:
    """Remove the folders of :func:`new_run_folders` and their new parents, as long as those are empty (a folder another
    run has written into meanwhile stays)."""
    for folder, existing in folders.items():
        shutil.rmtree(folder, ignore_errors=True)
        parent = folder.parent
        while parent != existing and parent.is_relative_to(existing):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


def subclasses_by_name(base: type) -> dict[str, type]:
    """Every imported subclass of ``base`` (at any depth) by class name: the names LightningCLI's parser (jsonargparse)
    accepts as a short ``class_path``."""
    found, todo = {}, list(base.__subclasses__())
    while todo:
        cls = todo.pop()
        if not cls.__name__.startswith("_"):
            found.setdefault(cls.__name__, cls)
        todo += cls.__subclasses__()
    return found


def import_packages(packages: tuple[str, ...]) -> None:
    """Import every module of ``packages`` (one level), so that the subclasses they define are known by name."""
    for package in packages:
        module = importlib.import_module(package)
        for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
            importlib.import_module(f"{package}.{info.name}")


def expand_model_names(argv: list[str], base: type) -> list[str]:
    """``argv`` with a short class name given to ``--model`` (``--model SFT``, ``--model=DPO``,
    ``--model.class_path DiffusionNFT``) replaced by the full class path of the subclass of ``base`` with that name.

    The full path is where the class is defined (``lit_videoalign.objectives.sft.SFT``), as in the shipped configs, so a
    checkpoint written by a run started with a short name records the same class path as one started from a config.
    Values with a dot, ``null``, a path that exists, or YAML/JSON text pass through unchanged.

    Raises:
        UsageError: no subclass of ``base`` has that name; the message lists the known ones.
    """
    known = subclasses_by_name(base)
    known.setdefault(base.__name__, base)
    out = list(argv)

    def expanded(value: str) -> str:
        if not value.isidentifier() or value.lower() in ("null", "none") or Path(value).exists():
            return value
        if value not in known:
            names = sorted(n for n in known if n != base.__name__)
            close = difflib.get_close_matches(value, names, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(f"--model {value}: no {base.__name__} class of that name{hint}; known: "
                             f"{', '.join(names)}, or a full class path (module.Class)")
        cls = known[value]
        return f"{cls.__module__}.{cls.__qualname__}"

    for i, arg in enumerate(out):
        if arg in ("--model", "--model.class_path") and i + 1 < len(out):
            out[i + 1] = expanded(out[i + 1])
        elif arg.startswith(("--model=", "--model.class_path=")):
            flag, value = arg.split("=", 1)
            out[i] = f"{flag}={expanded(value)}"
    return out


def canonical_class_path(class_path: str | None) -> str | None:
    """The path where a class is defined, for a path that names it through a re-export (``lit_videoalign.SFT``, how
    jsonargparse writes a short ``class_path: SFT`` from a YAML) -> ``lit_videoalign.objectives.sft.SFT``. Only this
    project's modules (or ones already imported) are imported to find out: a path read from a checkpoint never imports
    anything new from elsewhere. Other paths come back unchanged."""
    if not class_path or "." not in class_path:
        return class_path
    module, _, name = class_path.rpartition(".")
    if module.split(".")[0] not in errors.PACKAGES and module not in sys.modules:
        return class_path
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return class_path
    return f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else class_path


class MethodSubcommandsCLI(LightningCLI):
    """LightningCLI with subcommands that are methods of the CLI class besides the Trainer's; the base of
    ``videoalign`` and ``reward-zoo``.

    A method subcommand's signature becomes its arguments (LightningCLI alone takes every subcommand from the
    Trainer). Models take their optimizers as callables in their config, so LightningCLI's automatic optimizer
    arguments are off; a re-run overwrites the saved ``config.yaml``.

    ``--ckpt_path`` must be a Lightning checkpoint of the config's model class (LightningCLI alone would build the
    checkpoint's class instead) with the model's keys and shapes, checked before any state is touched. A Trainer
    subcommand that fails before its first optimizer step removes the log and checkpoint folders it created.

    Args:
        model_class: the LightningModule base class the config's ``model:`` subclasses.
        *args, **kwargs: LightningCLI arguments.
    """

    #: subcommands that are methods of this class (``name -> arguments LightningCLI fills, not the command line``)
    method_subcommands: dict[str, set[str]] = {}
    #: arguments that take several space-separated values (``subcommand -> name -> (type, help)``), added by hand
    #: because a method's ``list[str]`` argument would otherwise need JSON on the command line
    multi_value_args: dict[str, dict[str, tuple[type, str]]] = {}
    #: what ``fit`` says when the config has no ``data:`` section
    fit_data_hint = "a LightningDataModule class_path"
    #: packages whose modules are imported before parsing, so ``--model NAME`` (and ``class_path: NAME`` in a YAML)
    #: finds every model class they define, not only those a config happened to import already
    model_packages: tuple[str, ...] = ()

    def __init__(self, model_class: type, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(model_class, None, *args, **kwargs)

    @override
    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        from lightning.pytorch.cli import _get_short_description

        self._subcommand_parsers = {}
        subcommands = parser.add_subcommands()
        for name in self.subcommands():
            klass = type(self) if name in self.method_subcommands else self.trainer_class
            description = _get_short_description(getattr(klass, name))
            sub_kwargs = {"description": description, **kwargs.get(name, {})}
            sub_parser = self._prepare_subcommand_parser(klass, name, **sub_kwargs)
            self._subcommand_parsers[name] = sub_parser
            subcommands.add_subcommand(name, sub_parser, help=description)

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # Short model class names (``--model SFT``) become full class paths before jsonargparse sees them, in every
        # subcommand; an unknown one is named with the known ones.
        import_packages(self.model_packages)
        if args is None or isinstance(args, (list, tuple)):
            expanded = expand_model_names(list(sys.argv[1:] if args is None else args), self._model_class)
            if args is None:  # the console script: the parser reads sys.argv
                sys.argv[1:] = expanded
            else:
                args = expanded
        super().parse_arguments(parser, args)

    def _add_multi_value_args(self, parser: LightningArgumentParser, subcommand: str) -> None:
        """Add ``subcommand``'s :attr:`multi_value_args` to its parser and to the arguments its method receives."""
        for name, (kind, help_text) in self.multi_value_args.get(subcommand, {}).items():
            parser.add_argument(f"--{name}", nargs="+", type=kind, default=None, help=help_text)
            self._subcommand_method_arguments[subcommand].append(name)

    def before_fit(self) -> None:
        if self.datamodule is None:
            raise UsageError(f"fit needs a 'data:' section in the config ({self.fit_data_hint})")

    @override
    def _parse_ckpt_path(self) -> None:
        # Before LightningCLI takes the checkpoint's hyperparameters (and, unchecked, its model class): the file must be
        # a Lightning checkpoint of the config's model class. Its tensors are memory-mapped, not read.
        self._ckpt = None
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        with errors.config_phase():
            if path and not (Path(path).is_dir() or path in ("last", "best", "hpc") or "://" in str(path)
                             or Path(path).suffix == ".safetensors"):
                ckpt = read_checkpoint(path, mmap=True)
                model = self.config[subcommand].get("model")
                init_args = model.get("init_args") if model is not None else None
                hparams = ckpt.get("hyper_parameters") or {}
                if hparams.get("_class_path"):  # the same class under two paths (a re-export) is the same class
                    hparams = {**hparams, "_class_path": canonical_class_path(hparams["_class_path"])}
                check_model_class({**ckpt, "hyper_parameters": hparams}, path,
                                  canonical_class_path(model.get("class_path")) if model is not None else None,
                                  init_args.as_dict() if init_args is not None else None)
                self._ckpt = {"path": path, "state_dict": ckpt["state_dict"], "global_step": ckpt.get("global_step", 0),
                              "class_path": (ckpt.get("hyper_parameters") or {}).get("_class_path")}
            super()._parse_ckpt_path()

    @override
    def instantiate_classes(self) -> None:
        with errors.config_phase():
            super().instantiate_classes()

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in self.method_subcommands:
            getattr(self, subcommand)(**self._prepare_subcommand_kwargs(subcommand))
            return
        new_folders = new_run_folders(self.trainer)
        start_step = self._ckpt["global_step"] if self._ckpt and subcommand == "fit" else 0
        try:
            if self._ckpt is not None and self.model is not None:  # keys and shapes, before any state is restored
                with errors.config_phase():
                    check_state_dict(self.model, self._ckpt["state_dict"], self._ckpt["path"],
                                     self._ckpt["class_path"])
            self._ckpt = None  # the memory-mapped file is not needed any more
            super()._run_subcommand(subcommand)
        except BaseException:
            # A run that fails before its first optimizer step (bad data, config, checkpoint or disk) leaves nothing
            # behind: no log folder with an empty event file and config.yaml, no empty checkpoint folder. One that
            # trained keeps its logs and checkpoints.
            if self.trainer.global_step <= start_step:
                remove_run_folders(new_folders)
            raise
