"""Toy-world evaluation shared by the ``benchmarks/toyworld_*`` benchmarks: held-out prompts, loading a trained model,
sampling with an NFE count, scoring (rewards and prompt agreement), trajectory error against the true physics, sample
diversity and paired differences to a reference.

Reward scoring goes through :func:`lit_videoalign.evaluation.score_videos` and intervals through
:func:`lit_videoalign.evaluation.bootstrap_interval`; what is toy-world specific (the simulator, prompt agreement,
the ball tracker) lives here. Every benchmark samples prompt ``i`` from seed ``i`` with every model, so differences to
the reference row are paired.
"""

from __future__ import annotations

import math
import os
import platform
import time
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks import mean_se
from lit_videoalign.data.toyworld import TEST_SEED_OFFSET, Ball, Scene, ToyWorld, prompt_agreement, simulate
from lit_videoalign.evaluation import bootstrap_interval, score_videos
from reward_zoo import create_reward
from reward_zoo.physics import TOY_GRAVITY, NewtonReward

AGREEMENT = ("colour", "direction", "falls", "all")  # prompt_agreement rates; "all": every check of a video holds
PRETRAINED = ("physics_learned", "quality", "identity")  # rewards whose shipped weights are the trained model
LOGIT_REWARDS = ("physics_learned", "quality")  # Bradley-Terry logits: only differences mean anything
RESTITUTIONS = torch.linspace(0.6, 0.85, 6).tolist()  # the range ToyWorld.sample_scene draws a ball's bounciness from
DIVERSITY_SEED_OFFSET = 1_000_000  # sampling seeds of the diversity videos, apart from the per-prompt seeds 0..n-1
REAL_SCENE_OFFSET = TEST_SEED_OFFSET + 1_000_000  # real scenes searched for same-prompt diversity, apart from prompts
REAL_SCENE_SEARCH = 20_000  # seeds scanned at most for them
# The toy-world benchmarks sample with our Euler grid, as every figure in the README was measured; the toy base's
# own FlowMatchEuler scheduler (generate's default) uses another sigma grid (falls 58 % vs 60 % on the base).
SAMPLER = "euler"


# -- prompts, rewards, models -----------------------------------------------------------------------------------------
def held_out_scenes(n: int) -> list:
    """The first ``n`` one-ball scenes of the toy world's test seed range (never trained on)."""
    world = ToyWorld(max_balls=1)
    return [world.example(TEST_SEED_OFFSET + i) for i in range(n)]


def load_reward(name: str):
    """A zoo reward by name, with its shipped weights where it has them, frozen and in eval mode."""
    return create_reward(name, pretrained=name in PRETRAINED).requires_grad_(False).eval()


def load_rewards(names) -> dict:
    return {name: load_reward(name) for name in names}


def load_student(spec: str):
    """Build a trained model from ``NAME=CONFIG[:WEIGHTS]``: the model its training config builds, with a ``.ckpt``, a
    ``.safetensors`` state dict or a ``PipelineExport`` folder loaded; returns ``(name, model)`` in eval mode."""
    from lit_videoalign.checkpoint_io import load_weights
    from lit_videoalign.cli import VideoAlignCLI

    if "=" not in spec:
        raise ValueError(f"a model must be given as NAME=CONFIG[:WEIGHTS], got {spec!r}")
    name, rest = spec.split("=", 1)
    config, _, weights = rest.partition(":")
    if not Path(config).is_file():
        raise FileNotFoundError(f"student config not found: {config}")
    args = ["--config", config, "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    if weights and Path(weights).is_dir():
        args.append(f"--model.init_args.backbone.init_args.pretrained_model_name_or_path={weights}")
    cli = VideoAlignCLI(args=args, run=False)
    model = cli.model
    if weights and not Path(weights).is_dir():
        load_weights(model, weights)
    return name, model.eval()


def parse_model(spec: str) -> tuple[str, float | None]:
    """Split ``NAME=CONFIG[:WEIGHTS][@CPU_MINUTES]`` into the :func:`load_student` spec and the CPU-minutes (``@-`` or
    none: not known). An ``@`` followed by a path is part of the path."""
    head, at, tail = spec.rpartition("@")
    if not at or "/" in tail:
        return spec, None
    if tail == "-":
        return head, None
    try:
        return head, float(tail)
    except ValueError:
        raise ValueError(f"CPU_MINUTES after '@' must be a number or '-', got {tail!r} in {spec!r}") from None


# -- sampling and scoring ---------------------------------------------------------------------------------------------
class NFECounter:
    """Counts denoiser evaluations per video: every forward call adds its batch size (guidance doubles it)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.samples = 0
        denoisers = [m for m in model.modules() if m.__class__.__name__.endswith("Transformer3DModel")]
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in denoisers]

    def _hook(self, module, args, kwargs, output) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.samples += hidden.shape[0]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def generate(model, prompts: list[str], seeds: list[int], batch_size: int = 16, images: Tensor | None = None,
             **gen_kwargs) -> Tensor:
    """``model.generate`` over ``prompts`` (prompt ``i`` from seed ``i``; image-to-video from ``images[i]`` when
    given) in batches: videos ``(n, t, c, h, w)``."""
    gen_kwargs.setdefault("sampler", SAMPLER)
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; expected one image per prompt")
    return torch.cat([model.generate(prompts[i:i + batch_size], seeds=seeds[i:i + batch_size], **gen_kwargs,
                                     **({} if images is None else {"images": images[i:i + batch_size]}))
                      for i in range(0, len(prompts), batch_size)])


def evaluate(model, prompts: list[str], seeds: list[int], rewards: dict, batch_size: int, return_videos: bool = False,
             **gen_kwargs) -> dict | tuple[dict, Tensor]:
    """Sample every prompt with its seed and measure rewards, agreement, NFE and wall time; with ``return_videos``,
    returns ``(measures, videos)`` so callers can measure more on the same samples."""
    counter = NFECounter(model)
    start = time.perf_counter()
    videos = generate(model, prompts, seeds, batch_size, **gen_kwargs)
    seconds = time.perf_counter() - start
    counter.remove()
    out = score(videos, prompts, rewards)
    out.update(nfe_per_video=counter.samples / len(prompts), seconds_per_video=seconds / len(prompts))
    return (out, videos) if return_videos else out


def agreement(videos: Tensor, prompts: list[str]) -> dict[str, list[float]]:
    """Per-video :func:`~lit_videoalign.data.toyworld.prompt_agreement` (1.0 or 0.0) for each of :data:`AGREEMENT`."""
    rows = [prompt_agreement(v.cpu(), p) for v, p in zip(videos, prompts)]
    out = {key: [float(r[key]) for r in rows] for key in AGREEMENT[:-1]}
    out["all"] = [float(all(r.values())) for r in rows]
    return out


def agreement_rates(videos: Tensor, prompts: list[str]) -> dict[str, float]:
    """The fraction of videos whose prompt agreement holds, per check of :data:`AGREEMENT`."""
    return {key: sum(v) / len(v) for key, v in agreement(videos, prompts).items()}


@torch.no_grad()
def reward_scores(videos: Tensor, prompts: list[str], rewards: dict) -> dict[str, list[float]]:
    """Each reward's ``overall`` score per video (:func:`lit_videoalign.evaluation.score_videos`, in one batch)."""
    rows = score_videos(rewards, videos, prompts, batch_size=max(1, videos.shape[0]))
    return {name: [row[f"{name}/overall"] for row in rows] for name in rewards}


def score(videos: Tensor, prompts: list[str], rewards: dict) -> dict:
    """Rewards (``NAME``: mean, ``NAME_sem``, ``NAME_per_video``) and prompt-agreement rates of ``videos``."""
    out = {}
    for name, values in reward_scores(videos, prompts, rewards).items():
        v = torch.tensor(values)
        out[f"{name}_per_video"] = values
        out[name] = v.mean().item()
        out[f"{name}_sem"] = (v.std() / math.sqrt(len(v))).item()
    out.update(agreement_rates(videos, prompts))
    return out


# -- trajectory error against true physics ----------------------------------------------------------------------------
@torch.no_grad()
def track(videos: Tensor, min_coverage: float = 0.2) -> tuple[Tensor, Tensor]:
    """Centre ``(b, t, 2)`` (x, y in pixels) and area ``(b, t)`` (pixels) of each video's ball, per frame.

    The soft per-colour coverage masks of ``newton`` (:meth:`NewtonReward.masks`); the ball is the palette colour with
    the largest mean area. Coverage below ``min_coverage`` is dropped, so faint noise spread over the background
    does not pull the centroid towards the middle of the frame (an anti-aliased disc loses a thin symmetric rim).
    """
    masks = NewtonReward().masks(videos.float())  # (b, t, k, h, w)
    masks = masks * (masks > min_coverage)
    b, t, k, h, w = masks.shape
    dominant = masks.sum((-2, -1)).mean(1).argmax(-1)  # (b,)
    mask = masks[torch.arange(b), :, dominant]  # (b, t, h, w)
    area = mask.sum((-2, -1))  # (b, t)
    xs = torch.arange(w, dtype=mask.dtype)
    ys = torch.arange(h, dtype=mask.dtype)
    cx = (mask.sum(-2) * xs).sum(-1) / area.clamp(min=1e-8)
    cy = (mask.sum(-1) * ys).sum(-1) / area.clamp(min=1e-8)
    return torch.stack([cx, cy], dim=-1), area


@torch.no_grad()
def trajectory_error(videos: Tensor, fit_frames: int = 4, restitutions: list[float] = RESTITUTIONS,
                     min_area: float = 2.0, per_frame: bool = False) -> Tensor:
    """Mean distance in pixels ``(b,)`` between each video's tracked ball and the true toy-world physics from its start.

    The initial state is the least-squares fit, on the first ``fit_frames`` frames, of ``x = x0 + vx s`` and
    ``y = y0 + vy s + g s^2 / 2`` with the toy world's gravity ``g`` (``TOY_GRAVITY`` frame heights per frame^2; one
    frame per time step) and the ball's radius from its median area; ``lit_videoalign.data.toyworld.simulate`` then
    carries it forward with floor bounces and elastic side walls. A scene's restitution is drawn per ball, so the
    error is the smallest over ``restitutions`` (the world's range). NaN where no ball is found (mean area below
    ``min_area`` pixels). ``per_frame``: the distances ``(b, t - fit_frames)`` of each frame after the fit instead
    (of the restitution with the smallest mean), for error-over-length curves.
    """
    b, t, c, h, w = videos.shape
    if not 2 <= fit_frames < t:
        raise ValueError(f"fit_frames must be in [2, {t - 1}] for {t}-frame videos, got {fit_frames}")
    gravity = TOY_GRAVITY * h  # px / frame^2
    pos, area = track(videos)  # (b, t, 2), (b, t)
    s = torch.arange(fit_frames, dtype=torch.float64)
    design = torch.stack([torch.ones_like(s), s], dim=1)  # (k, 2)
    fit = pos[:, :fit_frames].double()
    fit[..., 1] -= 0.5 * gravity * s**2
    coef = torch.linalg.lstsq(design.expand(b, -1, -1), fit).solution  # (b, 2, 2): rows (start, velocity), cols (x, y)
    errors = []
    for i in range(b):
        if not area[i].mean() >= min_area:
            errors.append(torch.full((t - fit_frames,), float("nan")))
            continue
        r = math.sqrt(float(area[i].median()) / math.pi)
        (x0, y0), (vx, vy) = coef[i].tolist()
        x0, y0 = min(max(x0, r - 0.5), w - 0.5 - r), min(max(y0, r - 0.5), h - 0.5 - r)
        best = None
        for e in restitutions:
            scene = Scene((Ball("red", r, x0, y0, vx, vy, e),), gravity, t, h, w)
            true = simulate(scene).positions[:, 0]  # (t, 2)
            dist = (true[fit_frames:] - pos[i, fit_frames:]).norm(dim=-1).float()  # (t - fit_frames,)
            best = dist if best is None or dist.mean() < best.mean() else best
        errors.append(best)
    errors = torch.stack(errors)  # (b, t - fit_frames)
    return errors if per_frame else errors.mean(1)


def trajectory_curve(videos: Tensor, fit_frames: int = 4) -> list[float]:
    """Mean tracking error against the true physics per frame index (NaN for the fitted frames), over the videos
    whose ball is found: the error-over-length curve of a set of long videos."""
    per_frame = trajectory_error(videos, fit_frames, per_frame=True)  # (b, t - fit_frames)
    found = per_frame[torch.isfinite(per_frame).all(1)]
    return [float("nan")] * fit_frames + found.mean(0).tolist()


def evaluate_length(videos: Tensor, prompts: list[str], rewards: dict, window: int, fit_frames: int = 4) -> dict:
    """The trajectory error of whole (possibly streamed, longer than trained) videos ``(b, t, c, h, w)`` and the
    rewards and prompt agreement of their last ``window`` frames (the length the rewards were trained on)."""
    row = score(videos[:, -window:], prompts, rewards)
    add_trajectory(row, videos, fit_frames)
    return row


def add_trajectory(row: dict, videos: Tensor, fit_frames: int) -> None:
    """Add ``trajectory_error`` (mean, ``_sem``, ``_per_video``) and the tracked fraction to ``row``."""
    err = trajectory_error(videos, fit_frames).tolist()
    row["trajectory_error_per_video"] = err
    row["trajectory_error"], row["trajectory_error_sem"] = mean_se(err)
    row["tracked"] = sum(math.isfinite(e) for e in err) / len(err)


# -- image-to-video: is the given first frame kept? -------------------------------------------------------------------
def held_out_images(n: int) -> Tensor:
    """The first frames ``(n, c, h, w)`` of :func:`held_out_scenes`: the held-out conditioning images, in order."""
    return torch.stack([scene.video[0] for scene in held_out_scenes(n)])


@torch.no_grad()
def add_image_measures(row: dict, videos: Tensor, images: Tensor, identity) -> None:
    """Add, per video against its conditioning image (mean, ``_sem``, ``_per_video``): ``identity`` (the ``identity``
    reward's overall score with the image as its reference), ``colour_drift`` (the mean over frames of the ball's
    colour distance from the image's, :func:`benchmarks.toyworld_base.colour_drift`) and ``first_frame_error`` (mean
    absolute pixel difference of frame 0 from the image)."""
    from benchmarks.toyworld_base import colour_drift  # toyworld_base imports this module

    values = {"identity": identity(videos, None, references=images)["overall"].float(),
              "colour_drift": colour_drift(videos.float(), images.float()),
              "first_frame_error": (videos[:, 0] - images).abs().flatten(1).mean(1).float()}
    for key, v in values.items():
        row[f"{key}_per_video"] = v.tolist()
        row[key], row[f"{key}_sem"] = mean_se(row[f"{key}_per_video"])


# -- sample diversity -------------------------------------------------------------------------------------------------
def diversity(videos: Tensor, downsample: int = 2) -> float:
    """Mean pairwise RMS pixel distance between the videos ``(n, t, c, h, w)`` of one prompt (frames average-pooled by
    ``downsample``): 0 when all are identical."""
    n = videos.shape[0]
    if n < 2:
        raise ValueError(f"diversity needs at least two videos, got {n}")
    small = F.avg_pool2d(videos.float().flatten(0, 1), downsample) if downsample > 1 else videos.float().flatten(0, 1)
    flat = small.reshape(n, -1)  # (n, t * c * h' * w')
    dist = torch.cdist(flat[None], flat[None])[0] / math.sqrt(flat.shape[1])  # (n, n)
    return (dist.sum() / (n * (n - 1))).item()


def add_diversity(row: dict, groups: list[Tensor]) -> None:
    """Add ``diversity`` (mean over prompts, ``_sem``, ``_per_prompt``) of the same-prompt video ``groups``."""
    per_prompt = [diversity(g) for g in groups]
    row["diversity_per_prompt"] = per_prompt
    row["diversity"], row["diversity_sem"] = mean_se(per_prompt)


def diversity_videos(model, prompts: list[str], per_prompt: int, batch_size: int,
                     images: Tensor | None = None) -> list[Tensor]:
    """``per_prompt`` videos of each prompt (image-to-video: all from that prompt's image), from seeds apart from the
    per-prompt ones (:data:`DIVERSITY_SEED_OFFSET`): one group ``(per_prompt, t, c, h, w)`` per prompt."""
    div_prompts = [p for p in prompts for _ in range(per_prompt)]
    div_seeds = [DIVERSITY_SEED_OFFSET + i for i in range(len(div_prompts))]
    div_images = None if images is None else images[:len(prompts)].repeat_interleave(per_prompt, dim=0)
    return list(generate(model, div_prompts, div_seeds, batch_size, images=div_images).split(per_prompt))


def same_prompt_scenes(world: ToyWorld, prompts: list[str], per_prompt: int) -> dict[str, Tensor]:
    """``per_prompt`` real videos ``(n, t, c, h, w)`` for each prompt, from other test-range seeds with that prompt."""
    found: dict[str, list[Tensor]] = {p: [] for p in prompts}
    for seed in range(REAL_SCENE_OFFSET, REAL_SCENE_OFFSET + REAL_SCENE_SEARCH):
        example = world.example(seed)
        if example.prompt in found and len(found[example.prompt]) < per_prompt:
            found[example.prompt].append(example.video)
            if all(len(v) == per_prompt for v in found.values()):
                break
    return {p: torch.stack(v) for p, v in found.items() if len(v) >= 2}


# -- paired comparisons -----------------------------------------------------------------------------------------------
def paired(row: dict, base: dict, key: str) -> tuple[float, float]:
    """Mean paired difference of ``key`` to the base (same prompt, same seed) and its standard error (NaN when either
    row lacks ``KEY_per_video``)."""
    a, b = row.get(f"{key}_per_video"), base.get(f"{key}_per_video")
    if a is None or b is None:
        return float("nan"), float("nan")
    return mean_se([x - y for x, y in zip(a, b)])


def paired_ci95(row: dict, base: dict, key: str) -> tuple[float, float]:
    """Mean paired difference and its 95 % half-width (normal approximation, ``1.96`` standard errors)."""
    mean, se = paired(row, base, key)
    return mean, 1.96 * se


def bootstrap_ci(diff: Tensor | list[float], seed: int = 0) -> list[float]:
    """95 % percentile-bootstrap interval of the mean of paired differences (2000 seeded resamples)."""
    return list(bootstrap_interval(diff, confidence=0.95, num_resamples=2000, seed=seed))


def relative(value: float, reference: float) -> float:
    """Change in percent of the reference's magnitude (rewards can be negative logits)."""
    return 100.0 * (value - reference) / max(abs(reference), 1e-8)


# -- run information and formatting -----------------------------------------------------------------------------------
def versions(*names: str) -> dict[str, str]:
    """Installed versions of the named distributions ("not installed" where absent)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def fmt(value: float | None, se: float | None = None, digits: int = 3) -> str:
    """``value ± se`` to ``digits`` decimals; "-" for a missing or non-finite value."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None and math.isfinite(se) else "")
