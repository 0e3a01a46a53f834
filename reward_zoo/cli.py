"""The ``reward-zoo`` command: train learned rewards, score video files with any reward, list the zoo.

    reward-zoo fit --config rewards/quality                       # RewardTraining on preference pairs (shipped)
    reward-zoo validate --config configs/rewards/quality.yaml
    reward-zoo score --reward quality --videos clips/ --prompts_file prompts.txt --output_dir scores
    reward-zoo list
    reward-zoo serve --reward quality --port 8765                 # HTTP reward server on loopback (reward_zoo.server)
    reward-zoo convert hpsv2 HPS_v2.1_compressed.pt hpsv2-converted --tokenizer laion/CLIP-ViT-H-14-laion2B-s32B-b79K
    reward-zoo convert videoreward VideoReward/ videoreward-converted --videoalign_repo VideoAlign/

``fit/validate/test`` are LightningCLI's, reading ``model:`` (a :class:`~reward_zoo.training.RewardTraining`),
``data:`` and ``trainer:`` from the YAML. ``score``, ``list`` and ``serve`` are tools that build no trainer: ``score``
decodes MP4 files (PyAV) and writes a JSON and a CSV table of per-dimension scores; ``list`` prints every registered
reward with its family, dimensions, differentiability, licence and whether weights ship with the package; ``serve``
serves a reward over HTTP until Ctrl-C or SIGTERM (clients: ``create_reward("remote", url=...)``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from jsonargparse import ActionYesNo
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lit_videoalign.errors import UsageError, config_phase, run_cli, shorten
from lit_videoalign.subcommands import MethodSubcommandsCLI
from reward_zoo.training import RewardTraining

# Subcommands that build no model, datamodule or trainer; their arguments are their method's signature
# (name -> CLI-filled args).
TOOL_SUBCOMMANDS: dict[str, set[str]] = {"score": set(), "list": set(), "convert": set(), "serve": set()}
# Positional arguments of tool subcommands (``reward-zoo convert FAMILY SOURCE DESTINATION``), added by hand.
POSITIONAL_ARGS = {"convert": {
    "family": "the checkpoint's family, one of the keys of reward_zoo.cli.CONVERTERS (hpsv2, ...)",
    "source": "the published checkpoint (file or folder) as its authors distribute it",
    "destination": "the folder to write (config.json, model.safetensors, README.md); must not exist or be empty",
}}
# Arguments that take several space-separated values (``--videos A B C``), added by hand to the parser.
MULTI_VALUE_ARGS = {"score": {
    "videos": (str, "video files and/or folders (every video file inside, sorted by name)"),
    "prompts": (str, "one prompt per video, in order (or use --prompts_file)"),
    "references": (str, "one reference image (PNG/JPG) per video, for identity rewards"),
}}
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")
# Shipped configs by name: `reward-zoo fit --config rewards/quality`, `reward-zoo serve --reward rewards/vlm_judge_...`
CONFIG_ROOTS = {"rewards/": Path(__file__).resolve().parent / "configs"}


class RewardZooCLI(MethodSubcommandsCLI):
    """The ``reward-zoo`` CLI: LightningCLI for :class:`RewardTraining` plus ``score`` and ``list``, tools that build
    no model, datamodule or trainer."""

    method_subcommands = TOOL_SUBCOMMANDS
    multi_value_args = MULTI_VALUE_ARGS
    fit_data_hint = ("a LightningDataModule of preference pairs, e.g. "
                     "lit_videoalign.data.toyworld_pairs.ToyWorldPairsDataModule")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(RewardTraining, *args, **kwargs)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        subcommands = LightningCLI.subcommands()
        subcommands.pop("predict")  # a reward is scored with `score`, not Trainer.predict
        return {**subcommands, **TOOL_SUBCOMMANDS}

    @override
    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
        if subcommand not in TOOL_SUBCOMMANDS:
            return super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        # no model/data/trainer groups: only the method's own arguments
        parser = self.init_parser(**kwargs)
        skip = set(MULTI_VALUE_ARGS.get(subcommand, {})) | set(POSITIONAL_ARGS.get(subcommand, {})) | {"pretrained",
                                                                                                "allow_remote"}
        self._subcommand_method_arguments[subcommand] = parser.add_method_arguments(klass, subcommand, skip=skip)
        for name, help_text in POSITIONAL_ARGS.get(subcommand, {}).items():
            parser.add_argument(name, type=str, help=help_text)
            self._subcommand_method_arguments[subcommand].append(name)
        self._add_multi_value_args(parser, subcommand)
        if subcommand in ("score", "serve"):
            parser.add_argument("--pretrained", action=ActionYesNo, default=None,
                                help="load shipped weights for a registered name (default: when they exist); "
                                     "--no_pretrained builds it untrained")
            self._subcommand_method_arguments[subcommand].append("pretrained")
        if subcommand == "serve":
            parser.add_argument("--allow_remote", action=ActionYesNo, default=False,
                                help="allow a --host that is not loopback. The server has no authentication or "
                                     "encryption: anyone who reaches it can run the reward on their inputs, so by "
                                     "default it only listens on loopback (reach it from elsewhere through an SSH "
                                     "tunnel)")
            self._subcommand_method_arguments[subcommand].append("allow_remote")
        return parser

    @override
    def _set_seed(self) -> None:
        if self.subcommand not in TOOL_SUBCOMMANDS:
            super()._set_seed()

    @override
    def instantiate_classes(self) -> None:
        if self.subcommand in TOOL_SUBCOMMANDS:
            with config_phase():
                self.config_init = self.parser.instantiate_classes(self.config)
            self.model = self.datamodule = self.trainer = None
            return
        super().instantiate_classes()

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in TOOL_SUBCOMMANDS:
            config = self.config_init[subcommand]
            getattr(self, subcommand)(**{k: config[k] for k in self._subcommand_method_arguments[subcommand]})
        else:
            super()._run_subcommand(subcommand)

    # -- tools --------------------------------------------------------------------------------------------------
    def score(
        self,
        reward: str,
        videos: list[str] | None = None,
        pretrained: bool | None = None,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
        references: list[str] | None = None,
        num_frames: int | None = None,
        output_dir: str = "outputs/scores",
        device: str = "cpu",
    ) -> list[dict]:
        """Score video files with a reward and write scores.json and scores.csv (one row per video).

        Args:
            reward: a registered reward name, ``hf-hub:org/repo``, or a folder written by ``save_pretrained``.
            videos: video files (MP4, ...) and/or folders (the videos their ``metadata.jsonl`` lists, else every
                video file inside, sorted by name).
            pretrained: for a registered name, load its shipped weights (default: when they ship).
            prompts: one prompt per video, in order.
            prompts_file: a text file with one prompt per line, or a ``metadata.jsonl`` of ``{"file_name",
                "prompt"}`` lines (the videofolder layout). By default each video takes its prompt from the
                ``metadata.jsonl`` beside it, as in a ``videoalign generate`` folder.
            references: one reference image (PNG/JPG) per video, for identity rewards.
            num_frames: score only the first ``num_frames`` frames of each video (every video must have them).
            output_dir: where scores.json and scores.csv go.
            device: torch device to score on.
        """
        rows = score_files(reward, videos or [], pretrained=pretrained, prompts=prompts, prompts_file=prompts_file,
                           references=references, num_frames=num_frames, device=device)
        json_path, csv_path = write_scores(rows, output_dir)
        print(format_table(rows))
        print(f"wrote {json_path} and {csv_path}")
        return rows

    def list(self, family: str | None = None, output: str | None = None) -> list[dict]:
        """List the registered rewards: family, dimensions, differentiable, licence, shipped weights.

        Args:
            family: only this family (``physics``, ``temporal``, ``identity``, ``quality``, ...).
            output: also write the table to this ``.json`` or ``.csv`` file.
        """
        rows = zoo_table(family)
        print(format_table(rows))
        if output is not None:
            _write_rows(rows, Path(output))
            print(f"wrote {output}")
        return rows

    def serve(self, reward: str, port: int = 8765, host: str = "127.0.0.1", max_batch: int = 8,
              max_request_mb: float = 1024.0, delay_s: float = 0.0, pretrained: bool | None = None,
              allow_remote: bool = False, device: str = "cpu") -> None:
        """Serve a reward over HTTP on loopback until Ctrl-C or SIGTERM.

        Endpoints ``POST /score``, ``POST /compare``, ``GET /health``, ``GET /info``; concurrent requests are batched.
        Clients use ``create_reward("remote", url="http://HOST:PORT")``; the wire format is described in
        ``reward_zoo/server.py``.

        Args:
            reward: a registered reward name, ``hf-hub:org/repo``, a folder written by ``save_pretrained``, a
                YAML/JSON file holding ``{class_path, init_args}`` (as under ``reward:`` in a training config), or a
                shipped one by name (``rewards/vlm_judge_videoscore2``).
            port: TCP port (0 picks a free one; the URL is printed).
            host: address to listen on; loopback only unless --allow_remote.
            max_batch: most videos per reward call (a pair counts as two); concurrent requests are batched up to it.
            max_request_mb: largest request body accepted (MiB), checked before it is read.
            delay_s: sleep before each reward call (emulates a slow judge in benchmarks).
            pretrained: for a registered name, load its shipped weights (default: when they ship).
            allow_remote: listen on a non-loopback host (see --allow_remote).
            device: torch device the reward runs on.
        """
        from lit_videoalign.shipped_configs import BUILTIN, config_path
        from reward_zoo.server import serve

        spec = reward
        if reward.startswith((BUILTIN, *CONFIG_ROOTS)) and not Path(reward).exists():
            reward = str(config_path(reward, CONFIG_ROOTS, "reward-zoo"))
        serve(reward, port=port, host=host, max_batch=max_batch, max_request_mb=max_request_mb, delay_s=delay_s,
              pretrained=pretrained, allow_remote=allow_remote, device=device, name=spec)

    def convert(self, family: str, source: str, destination: str, tokenizer: str | None = None,
                num_frames: int | None = None, videoalign_repo: str | None = None,
                prompt_sha256: str | None = None) -> str:
        """Convert a published checkpoint into the zoo's Hub layout (``config.json``, ``model.safetensors`` and a
        model card), loadable with ``create_reward(DESTINATION)`` or, once pushed, ``create_reward("hf-hub:...")``.
        Pickle files are read with ``torch.load(weights_only=True)`` only; on any error nothing is written.

        Args:
            family: the checkpoint's family (``hpsv2``, ...), positional.
            source: the published checkpoint, positional.
            destination: the folder to write, positional.
            tokenizer: the tokenizer or processor (Hub id or folder) the converted reward names in its config
                (default: the family's).
            num_frames: frames the converted reward scores per video (default: the family's).
            videoalign_repo: videoreward: a checkout of github.com/KlingAIResearch/VideoAlign, whose prompt template
                (not shipped here) is read into the converted config.
            prompt_sha256: videoreward: the SHA-256 of a prompt template other than the pinned revision's, accepted.
        """
        if family not in CONVERTERS:
            raise UsageError(f"unknown checkpoint family {family!r} for convert; known: {sorted(CONVERTERS)}")
        options = {"tokenizer": tokenizer, "num_frames": num_frames, "videoalign_repo": videoalign_repo,
                   "prompt_sha256": prompt_sha256}
        options = {k: v for k, v in options.items() if v is not None}
        if family != "videoreward" and (videoalign_repo or prompt_sha256):
            raise UsageError(f"--videoalign_repo and --prompt_sha256 apply to videoreward only, not {family}")
        out = CONVERTERS[family](source, destination, **options)
        print(f"wrote {out}")
        return str(out)


def _convert_hpsv2(source: str, destination: str, tokenizer: str | None = None, **options) -> Path:
    from reward_zoo.hpsv2 import convert_hpsv2

    if tokenizer is not None:
        options["tokenizer_name_or_path"] = tokenizer
    return convert_hpsv2(source, destination, **options)


def _convert_videoreward(source: str, destination: str, tokenizer: str | None = None, num_frames: int | None = None,
                         videoalign_repo: str | None = None, prompt_sha256: str | None = None) -> Path:
    """VideoAlign's folder; ``tokenizer`` names the Qwen2-VL base (processor, config and, for LoRA, weights),
    by default ``model_name_or_path`` of its ``model_config.json``; ``videoalign_repo`` the VideoAlign checkout whose
    prompt template the reward needs."""
    from reward_zoo.videoalign_checkpoint import convert_videoreward

    if num_frames is not None:
        raise UsageError(f"videoreward samples frames by time (at its checkpoint's fps), not a fixed count; "
                         f"drop --num_frames {num_frames}")
    if videoalign_repo is None:
        raise UsageError("videoreward needs VideoAlign's prompt template, which is not shipped here; pass "
                         "--videoalign_repo PATH_TO_VIDEOALIGN_CHECKOUT (git clone https://github.com/KlingAIResearch/"
                         "VideoAlign)")
    return convert_videoreward(source, destination, videoalign_repo, base_model=tokenizer,
                               processor_name_or_path=tokenizer, prompt_sha256=prompt_sha256)


# ``reward-zoo convert FAMILY SOURCE DESTINATION``: family -> converter(source, destination, tokenizer=None,
# num_frames=None) returning the written folder. A family with a converter adds its line here.
CONVERTERS = {"hpsv2": _convert_hpsv2, "videoreward": _convert_videoreward}


# -- score / list helpers (plain functions, so they are usable without the CLI) ---------------------------------
def zoo_table(family: str | None = None) -> list[dict]:
    """One row per registered reward: name, family, dimensions, differentiable, licence, shipped weights."""
    from reward_zoo.registry import list_rewards, reward_info

    rows = []
    for name in list_rewards(family):
        info = reward_info(name)
        rows.append({
            "name": name,
            "family": info["family"],
            "dimensions": "?" if info["dimensions"] is None else " ".join((*info["dimensions"], "overall")),
            "differentiable": "?" if info["differentiable"] is None else info["differentiable"],
            "license": info["license"] or "?",
            "weights": "yes" if info["pretrained"] else "no",
        })
    return rows


def collect_videos(paths: list[str]) -> list[Path]:
    """Expand files and folders into a list of video files; raises on a missing path or an empty folder.

    A folder with a ``metadata.jsonl`` (what ``videoalign generate`` writes) gives the videos it lists, in its order,
    so previews or stray files beside them are never scored; any other folder gives every video file inside, sorted
    by name.
    """
    from lit_videoalign.video_io import MANIFEST, read_manifest

    if not paths:
        raise UsageError("no videos given; pass --videos FILE_OR_FOLDER [...]")
    files = []
    for item in paths:
        path = Path(item)
        if path.is_dir() and (path / MANIFEST).is_file():
            files += [file for file, _ in read_manifest(path)]
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"folder {path} holds no video files ({', '.join(VIDEO_SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"video file or folder not found: {path}")
    return files


def manifest_prompts(files: list[Path]) -> list[str | None]:
    """Each file's prompt from the ``metadata.jsonl`` beside it; None where there is none or it does not list the
    file."""
    from lit_videoalign.video_io import MANIFEST, read_manifest

    by_folder: dict[Path, dict[Path, str]] = {}
    prompts = []
    for file in files:
        folder = file.resolve().parent
        if folder not in by_folder:
            listed = read_manifest(folder) if (folder / MANIFEST).is_file() else []
            by_folder[folder] = {path: entry["prompt"] for path, entry in listed}
        prompts.append(by_folder[folder].get(file.resolve()))
    return prompts


def read_prompts(prompts_file: str | Path, files: list[Path]) -> list[str]:
    """Prompts for ``files`` from a text file (one per line) or a ``metadata.jsonl`` (matched by file name)."""
    path = Path(prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    if path.suffix == ".jsonl":
        by_name = {}
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from err
                if not isinstance(entry, dict) or "file_name" not in entry or not isinstance(entry.get("prompt"), str):
                    raise ValueError(f"{path}:{lineno}: expected {{\"file_name\": ..., \"prompt\": ...}}, "
                                     f"got {shorten(line)}")
                by_name[Path(entry["file_name"]).name] = entry["prompt"]
        missing = [f.name for f in files if f.name not in by_name]
        if missing:
            raise ValueError(f"{path} has no prompt for video {missing[0]!r}")
        return [by_name[f.name] for f in files]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def score_files(
    reward: str,
    videos: list[str],
    pretrained: bool | None = None,
    prompts: list[str] | None = None,
    prompts_file: str | None = None,
    references: list[str] | None = None,
    num_frames: int | None = None,
    device: str = "cpu",
) -> list[dict]:
    """Score video files with a reward; one row ``{"video", "prompt", <dimension>: float, ...}`` per video.

    Videos are decoded with PyAV and scored one at a time (they may differ in size and length); learned rewards
    resize frames to their own input size.
    """
    from lit_videoalign.video_io import check_video_files, read_video
    from reward_zoo import create_reward, registry

    files = collect_videos(videos)
    infos = check_video_files(files, num_frames, decode=False)  # every bad file in one error, before the reward loads
    if prompts is not None and prompts_file is not None:
        raise UsageError("pass prompts either with --prompts or with --prompts_file, not both")
    if prompts_file is not None:
        prompts = read_prompts(prompts_file, files)
    elif prompts is None:  # each video's prompt from the metadata.jsonl beside it (a generate folder's), where known
        prompts = manifest_prompts(files)
    if prompts is not None and len(prompts) != len(files):
        raise UsageError(f"got {len(prompts)} prompts for {len(files)} videos; expected one prompt per video")
    if references is not None and len(references) != len(files):
        raise UsageError(f"got {len(references)} references for {len(files)} videos; expected one per video")

    is_name = not reward.startswith(registry.HUB_PREFIX) and not Path(reward).is_dir()
    if is_name and pretrained is None:
        pretrained = (registry.PRETRAINED_DIR / reward / "config.json").is_file()
    model = create_reward(reward, pretrained=bool(pretrained) if is_name else False).to(device).eval()
    unprompted = [str(f) for f, p in zip(files, prompts) if p is None]
    if model.requires_prompts and unprompted:
        raise UsageError(f"{reward} needs prompts, and {len(unprompted)} of {len(files)} videos have none "
                         f"(first: {unprompted[0]}); pass --prompts or --prompts_file, or keep a metadata.jsonl "
                         "listing them beside the videos")

    rows = []
    for i, file in enumerate(files):
        video = read_video(file, num_frames=num_frames)[None].contiguous().to(device)  # (1, t, c, h, w)
        prompt = None if prompts is None or prompts[i] is None else [prompts[i]]
        ref = None if references is None else _read_image(references[i])[None].to(device)  # (1, c, h, w)
        with torch.no_grad():
            scores = model(video, prompt, ref, fps=infos[i].fps)  # the file's own frame rate
        row = {"video": str(file), "prompt": prompt[0] if prompt else ""}
        row.update({dim: float(scores[dim][0]) for dim in ("overall", *model.dimensions)})
        rows.append(row)
    return rows


def _read_image(path: str) -> torch.Tensor:
    """An image file as ``[C, H, W]`` float RGB in [0, 1]."""
    import numpy as np
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"reference image not found: {path}")
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def write_scores(rows: list[dict], output_dir: str | Path) -> tuple[Path, Path]:
    """Write ``scores.json`` and ``scores.csv`` (columns: video, prompt, overall, then each dimension)."""
    out = Path(output_dir)
    return _write_rows(rows, out / "scores.json"), _write_rows(rows, out / "scores.csv")


def _write_rows(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2) + "\n")
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise UsageError(f"output file must end in .json or .csv, got {path}")
    return path


def format_table(rows: list[dict]) -> str:
    """Rows as an aligned plain-text table (floats with 4 decimals)."""
    if not rows:
        return "(nothing to show)"
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    header = list(rows[0])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)


def main(args: list[str] | None = None, exit_on_error: bool | None = None) -> None:
    """Entry point of the ``reward-zoo`` console script: one-line errors as ``videoalign`` (``--traceback`` shows the
    stack; see :func:`lit_videoalign.errors.run_cli`)."""
    from lit_videoalign.shipped_configs import cli_builder

    run_cli(cli_builder(RewardZooCLI, CONFIG_ROOTS, "reward-zoo"), args, exit_on_error)


if __name__ == "__main__":
    main()
