"""The base of both command lines, ``videoalign`` and ``reward-zoo``: LightningCLI with method subcommands.

:class:`MethodSubcommandsCLI` adds subcommands that are methods of the CLI class, checks ``--ckpt_path`` against the
config's model class before any state is touched, and removes the folders of a Trainer subcommand that fails before
its first optimizer step. It imports no objective, data module or command of the suite, so the reward zoo can build on
it alone.
"""

from __future__ import annotations

import os
import shutil
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
                check_model_class(ckpt, path, model.get("class_path") if model is not None else None,
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
