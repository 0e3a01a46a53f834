"""The ``videoalign`` command: LightningCLI's ``fit/validate/test/predict``, ``generate``, ``evaluate``, ``precompute``.

    videoalign configs                                   # the shipped configs, usable by name from any folder
    videoalign fit --config toyworld/sft                 # a shipped config (or any YAML file: --config my.yaml)
    videoalign generate --config configs/toyworld/sft.yaml --prompts "a red ball falls" --output_dir outputs/gen
    videoalign generate --config configs/toyworld/self_forcing.yaml --ckpt_path last.ckpt --prompts "a red ball falls" \
        --stream --num_frames 64 --kv_window_chunks 3 --sink_chunks 1               # a causal student, past its length
    videoalign evaluate --videos outputs/gen --output_dir outputs/eval                      # score a video folder
    videoalign evaluate --config configs/toyworld/sft.yaml --ckpt_path last.ckpt --prompts_file prompts.txt \
        --baseline_ckpt_path base.ckpt --output_dir outputs/eval                           # two models, win rates
    videoalign precompute --config configs/wan2.1-1.3b/sft_lora.yaml --output_dir data/latents   # encode a dataset once

Every subcommand reads the same YAML (``model:``, ``data:``, ``trainer:``); extra subcommands are methods of
:class:`VideoAlignCLI` whose signature becomes their arguments. ``fit`` shows a Rich progress bar with the objective's
key metrics and ends with a table of where its outputs went. A wrong value, file or checkpoint ends the command with
one line ``error: ...`` (:mod:`lit_videoalign.errors`; ``--traceback`` shows the stack).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lit_videoalign import errors
from lit_videoalign.backbones.loading import resolve_device  # noqa: F401  (re-exported: its old home)
from lit_videoalign.checkpoint_io import load_weights
from lit_videoalign.data.video_folder import load_images
from lit_videoalign.errors import UsageError
from lit_videoalign.generation import (  # noqa: F401  (generate_videos and inference_sampler lived here before)
    check_sampler_name,
    generate_set,
    generate_videos,
    inference_sampler,
    resolve_prompts,
)
from lit_videoalign.objectives.base import AlignmentModule
from lit_videoalign.subcommands import (  # noqa: F401  (re-exported: their old home was this module)
    MethodSubcommandsCLI,
    new_run_folders,
    remove_run_folders,
)

EXTRA_SUBCOMMANDS = {"generate": {"model", "datamodule", "prompts", "seeds", "images", "stream"},
                     "evaluate": {"model", "datamodule", "prompts", "seeds", "rewards"},
                     "precompute": {"model", "datamodule"}}
_PROMPTS = (str, "prompts, one video each (and/or --prompts_file)")
_SEEDS = (int, "one seed per prompt (default 0, 1, ...)")
# Arguments that take several space-separated values (``--prompts P [P ...]``): name -> (type, help).
MULTI_VALUE_ARGS = {"generate": {"prompts": _PROMPTS, "seeds": _SEEDS,
                                 "images": (str, "image-to-video: one conditioning image per prompt, or one for all")},
                    "evaluate": {"prompts": _PROMPTS, "seeds": _SEEDS,
                                 "rewards": (str, "reward names, hf-hub:org/repo ids or folders (default: the "
                                                  "toy-world set)")}}
# Switches that also work bare (``--stream`` is ``--stream true``), added by hand: subcommand -> name -> help.
SWITCH_ARGS = {"generate": {"stream": "generate chunk by chunk with a causal student (SelfForcing), writing frames as "
                                      "they are produced; also past the trained length (--num_frames)"}}
# Subcommands whose model is optional (``evaluate`` can score a folder of videos without any model).
OPTIONAL_MODEL = {"evaluate"}


def with_atomic_checkpoints(trainer_config: dict) -> dict:
    """``trainer_config`` with :class:`~lit_videoalign.checkpoint_io.AtomicCheckpointIO` among its ``plugins``, unless
    a checkpoint writer is configured already (a plugin, or one given to the strategy)."""
    from lightning.pytorch.plugins.io import CheckpointIO

    from lit_videoalign.checkpoint_io import AtomicCheckpointIO

    plugins = trainer_config.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(p, CheckpointIO) for p in plugins) or getattr(trainer_config.get("strategy"), "_checkpoint_io",
                                                                     None) is not None:
        return trainer_config
    return {**trainer_config, "plugins": [*plugins, AtomicCheckpointIO()]}


class VideoAlignCLI(MethodSubcommandsCLI):
    """The ``videoalign`` CLI for :class:`AlignmentModule` subclasses: the Trainer's subcommands plus ``generate``,
    ``evaluate`` and ``precompute``.

    Checkpoints are written atomically (:func:`with_atomic_checkpoints`), so a run killed while saving keeps its
    previous checkpoint."""

    method_subcommands = EXTRA_SUBCOMMANDS
    multi_value_args = MULTI_VALUE_ARGS
    model_packages = ("lit_videoalign.objectives",)  # every objective, so --model SFT/DPO/DiffusionNFT/... resolves

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(AlignmentModule, *args, **kwargs)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), **EXTRA_SUBCOMMANDS}

    @override
    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
        if subcommand in OPTIONAL_MODEL:
            parser = self.init_parser(**kwargs)
            self.add_default_arguments_to_parser(parser)
            parser.add_lightning_class_args(self.trainer_class, "trainer")
            parser.add_lightning_class_args(self._model_class, "model", subclass_mode=True, required=False)
            parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=True, required=False)
            self.link_optimizers_and_lr_schedulers(parser)
            skip = set(self.subcommands()[subcommand])
            self._subcommand_method_arguments[subcommand] = parser.add_method_arguments(klass, subcommand, skip=skip)
        else:
            parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        self._add_multi_value_args(parser, subcommand)
        for name, help_text in SWITCH_ARGS.get(subcommand, {}).items():
            parser.add_argument(f"--{name}", type=bool, nargs="?", const=True, default=False, help=help_text)
            self._subcommand_method_arguments[subcommand].append(name)
        return parser

    @override
    def before_fit(self) -> None:
        """Before the first step: say so when bf16 would run on a CPU without bf16 hardware (one line, once)."""
        from lit_videoalign.precision import warn_if_slow_bf16

        super().before_fit()
        warn_if_slow_bf16(self.trainer, self.model)

    @override
    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        # fit: a Rich progress bar with the objective's key metrics (unless disabled or another bar is configured)
        # and a summary of where the outputs went.
        if self.subcommand == "fit":
            from lightning.pytorch.callbacks import ProgressBar

            from lit_videoalign.callbacks.progress_bar import VideoAlignProgressBar
            from lit_videoalign.callbacks.run_summary import RunSummary

            given = config.get("callbacks") or []
            given = given if isinstance(given, list) else [given]
            extra = [] if any(isinstance(cb, RunSummary) for cb in [*given, *callbacks]) else [RunSummary()]
            if config.get("enable_progress_bar", True) is not False and not any(
                    isinstance(cb, ProgressBar) for cb in [*given, *callbacks]):
                extra.append(VideoAlignProgressBar())
            callbacks = [*callbacks, *extra]
        return super()._instantiate_trainer(with_atomic_checkpoints(config), callbacks)

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
        sampler: str = "pipeline",
        output_dir: str = "outputs/generate",
        batch_size: int = 8,
        fps: int | None = None,
        gif: bool = True,
        device: str | None = None,
        reward: str | None = None,
        best_of_n: int = 1,
        noise_search_nfe: int | None = None,
        reward_guidance: float = 0.0,
        images: list[str] | None = None,
        stream: bool = False,
        num_frames: int | None = None,
        kv_window_chunks: int | None = None,
        sink_chunks: int | None = None,
    ) -> list[Path]:
        """Generate videos for prompts and seeds: one MP4 per video (and a GIF preview in ``previews/``) and a
        ``metadata.jsonl`` manifest that lists them all, so ``reward-zoo score --videos DIR`` and ``evaluate --videos``
        read the folder as it is.

        With ``--reward`` the samples are aligned at inference time (``lit_videoalign.inference``), without touching
        the weights: ``--best_of_n N`` keeps the best of N seeds, ``--noise_search_nfe B`` searches initial noises
        within B denoiser evaluations per video, ``--reward_guidance S`` nudges every step up the reward's gradient.
        The scores and denoiser evaluations spent go to ``inference.json`` beside the videos.

        With ``--stream`` a causal student (SelfForcing) generates chunk by chunk and each MP4 grows as its chunks
        are produced (:mod:`lit_videoalign.streaming`), also past the trained length (``--num_frames``), with a rolling
        KV cache of the last ``--kv_window_chunks`` chunks and, with ``--sink_chunks``, the first ones kept for good.

        Args:
            prompts: prompts to generate (and/or use ``prompts_file``).
            prompts_file: a text file with one prompt per line (``#`` lines skipped).
            seeds: one seed per prompt (default 0, 1, ...).
            ckpt_path: trained weights (``.ckpt`` from ``fit`` or ``.safetensors``); default: the config's model.
            num_inference_steps: sampler steps (default: the model's).
            guidance_scale: classifier-free guidance (default: the model's).
            sampler: ``pipeline`` (the model's own diffusers scheduler, as deployed: UniPC for Wan) or ``euler`` (the
                Euler ODE of training). A few-step student uses its own sampler; ``--reward_guidance`` the Euler ODE.
            output_dir: where the files go.
            batch_size: videos generated at once.
            fps: frames per second of the written files (default: the backbone's, e.g. Wan 16, the toy world 8).
            gif: also write a GIF preview of each video into ``output_dir/previews/`` (its manifest entry names it).
            device: torch device to generate on (default: CUDA when available, else CPU).
            reward: a zoo reward name (shipped weights loaded when they exist), ``hf-hub:`` id or folder, for the
                inference-time options below.
            best_of_n: candidates per prompt, the reward's best kept (1 = plain sampling).
            noise_search_nfe: denoiser-evaluation budget per video for a greedy search over initial noises.
            reward_guidance: reward-gradient guidance scale (a differentiable reward is required; 0 = off).
            images: image-to-video models: one conditioning image file per prompt (or one for all), RGB,
                centre-cropped and resized to the model's frame size.
            stream: generate chunk by chunk with a causal student, writing frames as they are produced (no GIF
                previews: they would hold the whole video in memory).
            num_frames: with ``--stream``: frames per video, any whole number of chunks (default: the trained length).
            kv_window_chunks: with ``--stream``: chunks kept in the KV cache (default: the model's; all if unset).
            sink_chunks: with ``--stream``: first chunks kept in the KV window for good (default: the model's).
        """
        prompts, seeds = resolve_prompts(prompts, prompts_file, seeds)
        if stream:
            from lit_videoalign.streaming import check_stream_request, stream_videos

            check_stream_request(model, num_frames, kv_window_chunks, sink_chunks)
            others = {"--images": images, "--reward": reward, "--best_of_n": best_of_n != 1,
                      "--noise_search_nfe": noise_search_nfe, "--reward_guidance": reward_guidance,
                      "--guidance_scale": guidance_scale not in (None, 1.0)}  # the student's guidance is distilled in
            if given := [name for name, on in others.items() if on]:
                raise UsageError(f"--stream cannot be combined with {given[0]}; a causal student streams text-to-video "
                                 "with its own sampler")
            if ckpt_path is not None:
                load_weights(model, ckpt_path)
            model.to(resolve_device(device))
            files = stream_videos(model, prompts, seeds, output_dir, num_frames=num_frames,
                                  window_chunks=kv_window_chunks, sink_chunks=sink_chunks,
                                  num_inference_steps=num_inference_steps, batch_size=batch_size, fps=fps)
            print(f"wrote {len(files)} files and metadata.jsonl to {output_dir}")
            return files
        if given := [f"--{name}" for name, value in [("num_frames", num_frames), ("kv_window_chunks", kv_window_chunks),
                                                     ("sink_chunks", sink_chunks)] if value is not None]:
            raise UsageError(f"{given[0]} is only used with --stream")
        hp = model.hparams
        conditioning = load_images(images, len(prompts), hp.height, hp.width)
        check_sampler_name(sampler)
        method, log = inference_sampler(reward, best_of_n, noise_search_nfe, reward_guidance,
                                        num_inference_steps, guidance_scale, sampling=sampler)
        if ckpt_path is not None:
            load_weights(model, ckpt_path)
        model.to(resolve_device(device))
        _, files = generate_videos(model, prompts, seeds, output_dir, num_inference_steps=num_inference_steps,
                                   guidance_scale=guidance_scale, batch_size=batch_size, fps=fps, gif=gif,
                                   sampler=method, sampling=sampler, images=conditioning)
        if log is not None:
            (Path(output_dir) / "inference.json").write_text(json.dumps(log, indent=2))
        print(f"wrote {len(files)} files and metadata.jsonl to {output_dir}")
        return files

    def evaluate(
        self,
        model: AlignmentModule | None = None,
        datamodule=None,
        videos: str | None = None,
        baseline_videos: str | None = None,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
        seeds: list[int] | None = None,
        ckpt_path: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str = "pipeline",
        baseline_ckpt_path: str | None = None,
        baseline_num_inference_steps: int | None = None,
        baseline_guidance_scale: float | None = None,
        rewards: list[str] | None = None,
        name: str = "model",
        baseline_name: str = "baseline",
        num_frames: int | None = None,
        tie_tolerance: float = 0.0,
        ci: str = "wilson",
        output_dir: str = "outputs/evaluate",
        batch_size: int = 8,
        device: str | None = None,
    ) -> dict:
        """Score videos with zoo rewards: per-dimension tables (JSON, CSV, Markdown) and plots (PNG); given a baseline,
        per-reward win rates with 95% confidence intervals.

        The videos are a folder with a ``metadata.jsonl`` (``--videos``, as ``generate`` writes), or are generated from
        the config's model (``--ckpt_path`` for trained weights) for ``--prompts``/``--prompts_file`` and ``--seeds``
        into ``output_dir/videos/NAME``. The baseline is another folder (``--baseline_videos``), or the same model
        generated again with any of ``--baseline_ckpt_path``, ``--baseline_guidance_scale``,
        ``--baseline_num_inference_steps`` (without a baseline checkpoint, the config's own weights); pairs are
        matched by prompt and seed.

        Args:
            videos: folder of videos with ``metadata.jsonl``.
            baseline_videos: folder of baseline videos with ``metadata.jsonl``.
            prompts: prompts to generate for (and/or ``prompts_file``).
            prompts_file: a text file with one prompt per line.
            seeds: one seed per prompt (default 0, 1, ...).
            ckpt_path: trained weights of the model.
            num_inference_steps: sampler steps of the model (default: its own).
            guidance_scale: guidance of the model (default: its own).
            sampler: ``pipeline`` (the model's own diffusers scheduler) or ``euler`` (the Euler ODE), for the model and
                the baseline generated here.
            baseline_ckpt_path: weights of the baseline.
            baseline_num_inference_steps: sampler steps of the baseline (default: the model's ``num_inference_steps``).
            baseline_guidance_scale: guidance of the baseline (default: the model's ``guidance_scale``).
            rewards: reward names, ``hf-hub:org/repo`` ids or folders; default the toy-world set ``newton quality
                dynamic_degree physics_learned subject_consistency flicker`` (shipped weights loaded when they exist).
            name: label of the model in tables and plots.
            baseline_name: label of the baseline.
            num_frames: score only the first frames of each video file.
            tie_tolerance: score differences up to this count as ties (half a win).
            ci: ``wilson`` or ``bootstrap`` interval for win rates.
            output_dir: where the tables, plots and generated videos go.
            batch_size: videos generated at once.
            device: torch device (default: CUDA when available, else CPU).
        """
        from lit_videoalign.evaluation import (
            DEFAULT_REWARDS,
            build_rewards,
            evaluate_sets,
            print_evaluation,
            read_video_folder,
        )

        check_sampler_name(sampler)
        out = Path(output_dir)
        wants_baseline_model = any(v is not None for v in (baseline_ckpt_path, baseline_num_inference_steps,
                                                            baseline_guidance_scale))
        if baseline_videos is not None and wants_baseline_model:
            raise UsageError("give the baseline either as --baseline_videos or as baseline model settings "
                             "(--baseline_ckpt_path/--baseline_guidance_scale/--baseline_num_inference_steps), "
                             "not both")
        if (videos is None or wants_baseline_model) and model is None:
            raise UsageError("evaluate needs --videos FOLDER, or --config with a model to generate videos from")
        dev = resolve_device(device)
        reward_models = build_rewards(rewards, DEFAULT_REWARDS)  # a bad reward name fails before any generation
        if videos is not None:
            if prompts is not None or prompts_file is not None:
                raise UsageError("--videos brings its own prompts (metadata.jsonl); do not pass --prompts or "
                                 "--prompts_file")
            model_set = read_video_folder(videos, name=name, num_frames=num_frames)
            prompts, seeds = model_set.prompts, model_set.seeds
        else:
            prompts, seeds = resolve_prompts(prompts, prompts_file, seeds)
        initial = None
        if model is not None:
            model.to(dev)
            if ckpt_path is not None:
                if wants_baseline_model and baseline_ckpt_path is None:  # the baseline is the config's own weights
                    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
                load_weights(model, ckpt_path)
        if videos is None:
            model_set = generate_set(model, name, prompts, seeds, out / "videos" / name, num_inference_steps,
                                     guidance_scale, batch_size, sampling=sampler)
        baseline_set = None
        if baseline_videos is not None:
            baseline_set = read_video_folder(baseline_videos, name=baseline_name, num_frames=num_frames)
        elif wants_baseline_model:
            if baseline_ckpt_path is not None:
                load_weights(model, baseline_ckpt_path)
            elif initial is not None:
                model.load_state_dict(initial)
            baseline_seeds = seeds if seeds is not None else list(range(len(prompts)))
            steps = num_inference_steps if baseline_num_inference_steps is None else baseline_num_inference_steps
            guidance = guidance_scale if baseline_guidance_scale is None else baseline_guidance_scale
            baseline_set = generate_set(model, baseline_name, prompts, baseline_seeds, out / "videos" / baseline_name,
                                        steps, guidance, batch_size, sampling=sampler)
        for reward in reward_models.values():
            reward.to(dev)
        sets = [model_set] if baseline_set is None else [model_set, baseline_set]
        result = evaluate_sets(sets, reward_models, out, tie_tolerance=tie_tolerance, ci=ci)
        print_evaluation(result)
        return result

    def precompute(self, model: AlignmentModule, datamodule=None, output_dir: str | None = None, batch_size: int = 4,
                   shard_size: int = 128, device: str | None = None, num_workers: int = 0) -> Path:
        """Encode the config's video folder once into safetensors shards of VAE latents and prompt embeddings.

        ``fit`` with ``--data.init_args.precomputed DIR`` then reads them and runs neither VAE encoder nor text encoder
        (:mod:`lit_videoalign.data.precompute`).

        Args:
            output_dir: the folder to write (default: the config's ``data.init_args.precomputed``); written atomically.
            batch_size: videos encoded at once.
            shard_size: examples per shard file.
            device: torch device of the encoders (default: CUDA when available, else CPU).
            num_workers: data-loader processes decoding the videos.
        """
        from lit_videoalign.data.precompute import precompute_datamodule

        return precompute_datamodule(model, datamodule, output_dir, batch_size=batch_size, shard_size=shard_size,
                                     device=device, num_workers=num_workers)


def main(args: list[str] | None = None, exit_on_error: bool | None = None) -> None:
    """Entry point of the ``videoalign`` console script.

    A wrong config or argument, a missing file, an unreadable video or checkpoint ends the console script with one
    line ``error: ...`` (status 2 for the command line and config, 1 otherwise); ``--traceback`` or
    ``VIDEOALIGN_DEBUG=1`` shows the stack. Called from Python with ``args``, the exception is raised instead unless
    ``exit_on_error=True`` (see :func:`lit_videoalign.errors.run_cli`).
    """
    from lit_videoalign.shipped_configs import cli_builder

    errors.run_cli(cli_builder(VideoAlignCLI), args, exit_on_error)  # `videoalign configs`; --config NAME


if __name__ == "__main__":
    main()
