"""The ``videoalign`` command: LightningCLI's ``fit/validate/test/predict`` plus ``generate``.

    videoalign fit --config configs/toyworld/sft.yaml
    videoalign generate --config configs/toyworld/sft.yaml --prompts "a red ball falls" --output_dir outputs/gen

Every subcommand reads the same YAML (``model:``, ``data:``, ``trainer:``); extra subcommands are methods of
:class:`VideoAlignCLI` whose signature becomes their arguments.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lit_videoalign.objectives.base import AlignmentModule

EXTRA_SUBCOMMANDS = {"generate": {"model", "datamodule", "prompts", "seeds"}}
# Arguments that take several space-separated values (``--prompts P [P ...]``), added by hand to the parser.
MULTI_VALUE_ARGS = {"generate": {"prompts": str, "seeds": int}}


def load_weights(model: AlignmentModule, ckpt_path: str | os.PathLike) -> None:
    """Load trained weights into ``model`` from a safetensors file or a Lightning ``.ckpt`` (read with
    ``weights_only=True``, so nothing is unpickled beyond tensors and primitives). Keys must match exactly."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # a pickle with arbitrary objects is refused, not executed
            raise ValueError(f"cannot read {path} as a weights-only checkpoint: {err}") from err
        if not isinstance(state, dict) or "state_dict" not in state:
            raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict'); expected .ckpt or .safetensors")
        state = state["state_dict"]
    model.load_state_dict(state, strict=True)


class VideoAlignCLI(LightningCLI):
    """LightningCLI for :class:`AlignmentModule` subclasses with optimizers given as callables in the model config."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(AlignmentModule, None, *args, **kwargs)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), **EXTRA_SUBCOMMANDS}

    @override
    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        # LightningCLI takes every subcommand from the Trainer; ours come from methods of this class.
        from lightning.pytorch.cli import _get_short_description

        self._subcommand_parsers = {}
        subcommands = parser.add_subcommands()
        for name in self.subcommands():
            klass = type(self) if name in EXTRA_SUBCOMMANDS else self.trainer_class
            description = _get_short_description(getattr(klass, name))
            sub_kwargs = {"description": description, **kwargs.get(name, {})}
            sub_parser = self._prepare_subcommand_parser(klass, name, **sub_kwargs)
            self._subcommand_parsers[name] = sub_parser
            subcommands.add_subcommand(name, sub_parser, help=description)

    @override
    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyperparameters of --ckpt_path with weights_only=True; say clearly when that refuses.
        try:
            super()._parse_ckpt_path()
        except pickle.UnpicklingError as err:
            path = self.config[self.config.subcommand].get("ckpt_path")
            raise ValueError(f"cannot read {path} as a weights-only checkpoint: it holds pickled objects, which are "
                             "never unpickled; use a checkpoint written by `videoalign fit` or a .safetensors file"
                             ) from err

    @override
    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        for name, kind in MULTI_VALUE_ARGS.get(subcommand, {}).items():
            parser.add_argument(f"--{name}", nargs="+", type=kind, default=None)
            self._subcommand_method_arguments[subcommand].append(name)
        return parser

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in EXTRA_SUBCOMMANDS:
            getattr(self, subcommand)(**self._prepare_subcommand_kwargs(subcommand))
        else:
            super()._run_subcommand(subcommand)

    def before_fit(self) -> None:
        if self.datamodule is None:
            raise ValueError("fit needs a 'data:' section in the config (a LightningDataModule class_path)")

    def generate(
        self,
        model: AlignmentModule,
        datamodule=None,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
        seeds: list[int] | None = None,
        ckpt_path: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        output_dir: str = "outputs/generate",
        batch_size: int = 8,
        fps: int = 8,
        gif: bool = True,
    ) -> list[Path]:
        """Generate videos for prompts and seeds and write one MP4 (and GIF) per video.

        Args:
            prompts: prompts to generate (or use ``prompts_file``).
            prompts_file: a text file with one prompt per line.
            seeds: one seed per prompt (default 0, 1, ...).
            ckpt_path: trained weights (``.ckpt`` from ``fit`` or ``.safetensors``); default: the config's model.
            num_inference_steps: sampler steps (default: the model's).
            guidance_scale: classifier-free guidance (default: the model's).
            output_dir: where the files go.
            batch_size: videos generated at once.
            fps: frames per second of the written files.
            gif: also write a GIF beside each MP4.
        """
        from lit_videoalign.video_io import write_gif, write_mp4

        if prompts_file is not None:
            lines = Path(prompts_file).read_text().splitlines()
            prompts = (prompts or []) + [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise ValueError("no prompts given; pass --prompts P [P ...] or --prompts_file FILE")
        seeds = list(range(len(prompts))) if seeds is None else seeds
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; expected one seed per prompt")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if ckpt_path is not None:
            load_weights(model, ckpt_path)
        out = Path(output_dir)
        written = []
        for start in range(0, len(prompts), batch_size):
            chunk, chunk_seeds = prompts[start:start + batch_size], seeds[start:start + batch_size]
            videos = model.generate(chunk, chunk_seeds, num_inference_steps=num_inference_steps,
                                    guidance_scale=guidance_scale)
            for i, (prompt, seed, video) in enumerate(zip(chunk, chunk_seeds, videos)):
                stem = f"{start + i:04d}_seed{seed}_" + "".join(c if c.isalnum() else "_" for c in prompt)[:60]
                h, w = video.shape[-2:]
                upscale = 4 if min(h, w) < 128 else (2 if h % 2 or w % 2 else 1)  # tiny videos are viewed bigger
                written.append(write_mp4(video, out / f"{stem}.mp4", fps=fps, upscale=upscale))
                if gif:
                    write_gif(video, out / f"{stem}.gif", fps=fps)
                print(f"wrote {written[-1]}")
        print(f"{len(written)} videos in {out}")
        return written


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``videoalign`` console script."""
    VideoAlignCLI(args=args)


if __name__ == "__main__":
    main()
