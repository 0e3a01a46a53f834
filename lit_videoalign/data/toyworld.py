"""The toy world: procedural videos of coloured balls under gravity, with prompts and labelled corruptions.

Every video is generated from a seed, so the world needs no download and every split is reproducible. A scene
is one or two balls thrown into a box under constant gravity; they bounce off the floor (losing some energy) and
off the side walls. The ground-truth trajectory is kept as metadata, so rewards can be checked against the true
physics. Corruptions produce the "losers" later objectives and reward models learn from: physics violations,
visual damage and prompt mismatches, each with a label.

Videos follow the project convention: ``Tensor[T, C, H, W]`` per example (``[B, T, C, H, W]`` batched), float32,
RGB, values in ``[0, 1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_videoalign.data.resumable import ResumableDataLoader

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.16, 0.14),
    "green": (0.16, 0.80, 0.22),
    "blue": (0.20, 0.36, 0.96),
    "yellow": (0.96, 0.86, 0.14),
    "white": (0.95, 0.95, 0.95),
}
BACKGROUND = (0.08, 0.08, 0.10)
DIRECTIONS = ("falls", "moves left", "moves right")

PHYSICS_CORRUPTIONS = ("gravity_wrong", "gravity_zero", "teleport", "size_change", "time_reversal")
VISUAL_CORRUPTIONS = ("blur", "noise", "flicker")
PROMPT_CORRUPTIONS = ("wrong_colour", "wrong_direction")
CORRUPTIONS = PHYSICS_CORRUPTIONS + VISUAL_CORRUPTIONS + PROMPT_CORRUPTIONS

# Every word a toy-world prompt can contain; the shipped text encoder's vocabulary is built from it.
VOCABULARY = tuple(sorted({"a", "ball", "and", "bounces", ",", *COLOURS, *" ".join(DIRECTIONS).split()}))


@dataclass(frozen=True)
class Ball:
    """Initial state of one ball, in pixels and frames (velocity in px/frame)."""

    colour: str
    radius: float
    x: float
    y: float
    vx: float
    vy: float
    restitution: float


@dataclass(frozen=True)
class Scene:
    """Everything needed to simulate and render one video."""

    balls: tuple[Ball, ...]
    gravity: float  # px / frame^2, positive is down (image y grows downwards)
    num_frames: int
    height: int
    width: int


@dataclass
class Trajectory:
    """Ground-truth state per frame."""

    positions: Tensor  # (t, n, 2) centre (x, y) in pixels
    radii: Tensor  # (t, n)
    bounced: Tensor  # (n,) bool, touched the floor at least once


@dataclass
class ToyExample:
    """One video with its prompt and ground truth; ``corruption`` is None for a clean video."""

    video: Tensor  # (t, c, h, w) in [0, 1]
    prompt: str
    scene: Scene
    trajectory: Trajectory
    corruption: str | None = None
    meta: dict = field(default_factory=dict)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _choice(generator: torch.Generator, options: tuple | list):
    return options[int(torch.randint(len(options), (), generator=generator))]


def simulate(scene: Scene, substeps: int = 8) -> Trajectory:
    """Integrate the scene exactly between contacts (constant acceleration) with reflections at the walls.

    Within a sub-step the update is the closed-form ballistic one, so between contacts the trajectory is exactly a
    parabola; contacts are resolved at sub-step resolution.
    """
    n, t = len(scene.balls), scene.num_frames
    positions = torch.zeros(t, n, 2)
    radii = torch.zeros(t, n)
    bounced = torch.zeros(n, dtype=torch.bool)
    h = 1.0 / substeps
    g = scene.gravity
    for i, ball in enumerate(scene.balls):
        x, y, vx, vy, r = ball.x, ball.y, ball.vx, ball.vy, ball.radius
        floor = scene.height - 0.5 - r
        for f in range(t):
            positions[f, i, 0], positions[f, i, 1], radii[f, i] = x, y, r
            for _ in range(substeps):
                x, y, vy = x + vx * h, y + vy * h + 0.5 * g * h * h, vy + g * h
                if y > floor and vy > 0:  # floor contact: reflect and lose energy
                    y, vy = floor - (y - floor), -vy * ball.restitution
                    bounced[i] = True
                if y < r - 0.5 and vy < 0 and g < 0:  # ceiling, only reachable under inverted gravity
                    y, vy = 2 * (r - 0.5) - y, -vy * ball.restitution
                if x < r - 0.5 or x > scene.width - 0.5 - r:  # side walls are elastic
                    x = min(max(x, r - 0.5), scene.width - 0.5 - r)
                    vx = -vx
    return Trajectory(positions=positions, radii=radii, bounced=bounced)


def render(scene: Scene, trajectory: Trajectory) -> Tensor:
    """Draw anti-aliased discs on a flat background. Returns ``(t, 3, h, w)`` in ``[0, 1]``."""
    t, h, w = scene.num_frames, scene.height, scene.width
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    video = torch.tensor(BACKGROUND).view(1, 3, 1, 1).expand(t, 3, h, w).clone()
    for i, ball in enumerate(scene.balls):
        cx = trajectory.positions[:, i, 0].view(t, 1, 1)
        cy = trajectory.positions[:, i, 1].view(t, 1, 1)
        r = trajectory.radii[:, i].view(t, 1, 1)
        dist = ((xs - cx) ** 2 + (ys - cy) ** 2).sqrt()
        alpha = (r + 0.5 - dist).clamp(0.0, 1.0).unsqueeze(1)  # (t, 1, h, w) pixel coverage
        colour = torch.tensor(COLOURS[ball.colour]).view(1, 3, 1, 1)
        video = video * (1 - alpha) + colour * alpha
    return video


def direction_of(ball: Ball) -> str:
    """The prompt word for a ball's horizontal motion."""
    if abs(ball.vx) < 1e-6:
        return "falls"
    return "moves left" if ball.vx < 0 else "moves right"


def describe(scene: Scene, trajectory: Trajectory) -> str:
    """The prompt for a scene, e.g. ``"a red ball moves left and bounces , a blue ball falls"``."""
    clauses = []
    for i, ball in enumerate(scene.balls):
        clause = f"a {ball.colour} ball {direction_of(ball)}"
        if bool(trajectory.bounced[i]):
            clause += " and bounces"
        clauses.append(clause)
    return " , ".join(clauses)


class ToyWorld:
    """Seeded generator of toy-world scenes, videos, prompts and corruptions.

    Args:
        num_frames: frames per video.
        height: frame height in pixels.
        width: frame width in pixels.
        max_balls: 1 or 2 balls per scene.
        two_ball_prob: probability of a second ball when ``max_balls == 2``.
        gravity: downward acceleration in px/frame^2 (the default lets a ball cross a 32-pixel frame in 16 frames).
        colours: the colour names scenes draw from (a subset of ``COLOURS``).
    """

    def __init__(
        self,
        num_frames: int = 16,
        height: int = 32,
        width: int = 32,
        max_balls: int = 2,
        two_ball_prob: float = 0.3,
        gravity: float = 0.25,
        colours: tuple[str, ...] | list[str] | None = None,
    ) -> None:
        if num_frames < 4:
            raise ValueError(f"num_frames must be at least 4 to show motion, got {num_frames}")
        if height < 16 or width < 16:
            raise ValueError(f"height and width must be at least 16 pixels, got {height}x{width}")
        if max_balls not in (1, 2):
            raise ValueError(f"max_balls must be 1 or 2, got {max_balls}")
        if not 0.0 <= two_ball_prob <= 1.0:
            raise ValueError(f"two_ball_prob must be in [0, 1], got {two_ball_prob}")
        colours = tuple(colours) if colours is not None else tuple(COLOURS)
        unknown = [c for c in colours if c not in COLOURS]
        if unknown or len(colours) < 2:
            raise ValueError(f"colours must be at least two of {sorted(COLOURS)}, got {list(colours)}")
        self.num_frames, self.height, self.width = num_frames, height, width
        self.max_balls, self.two_ball_prob, self.gravity, self.colours = max_balls, two_ball_prob, gravity, colours

    # -- scenes ---------------------------------------------------------------------------------------------
    def sample_scene(self, generator: torch.Generator, *, require_bounce: bool = False) -> Scene:
        """Draw a scene; with ``require_bounce`` the first ball is guaranteed to hit the floor."""
        two = self.max_balls == 2 and torch.rand((), generator=generator).item() < self.two_ball_prob
        colours = list(self.colours)
        balls = []
        for i in range(2 if two else 1):
            colour = colours.pop(int(torch.randint(len(colours), (), generator=generator)))
            radius = _uniform(generator, 2.5, 4.0) * min(self.height, self.width) / 32
            direction = _choice(generator, DIRECTIONS)
            speed = _uniform(generator, 0.6, 1.4) * self.width / 32
            vx = {"falls": 0.0, "moves left": -speed, "moves right": speed}[direction]
            # Start on the side the ball moves away from, so it stays in frame longer.
            lo, hi = radius + 1, self.width - radius - 2
            x = {"falls": _uniform(generator, lo, hi), "moves left": _uniform(generator, (lo + hi) / 2, hi),
                 "moves right": _uniform(generator, lo, (lo + hi) / 2)}[direction]
            y_hi = self.height * (0.35 if require_bounce and i == 0 else 0.5)
            y = _uniform(generator, radius + 1, y_hi)
            vy = _uniform(generator, -0.8, 0.4) * self.height / 32
            balls.append(Ball(colour, radius, x, y, vx, vy, restitution=_uniform(generator, 0.6, 0.85)))
        scene = Scene(tuple(balls), self.gravity * self.height / 32, self.num_frames, self.height, self.width)
        if require_bounce and not bool(simulate(scene).bounced[0]):
            return self.sample_scene(generator, require_bounce=True)
        return scene

    def make(self, scene: Scene) -> ToyExample:
        """Simulate, render and describe a scene."""
        trajectory = simulate(scene)
        return ToyExample(render(scene, trajectory), describe(scene, trajectory), scene, trajectory)

    def example(self, seed: int, *, require_bounce: bool = False) -> ToyExample:
        """The clean example for ``seed`` (the same seed always gives the same video)."""
        generator = torch.Generator().manual_seed(seed)
        return self.make(self.sample_scene(generator, require_bounce=require_bounce))

    # -- corruptions ----------------------------------------------------------------------------------------
    def corrupt(self, example: ToyExample, kind: str, generator: torch.Generator) -> ToyExample:
        """Return a labelled corrupted copy of ``example``.

        Physics corruptions change the motion but keep the prompt; visual ones damage the pixels; prompt ones keep
        the video and change the prompt. ``time_reversal`` is only a violation when a bounce loses energy, so it
        needs an example whose first ball bounced.
        """
        if kind not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {kind!r}; expected one of {list(CORRUPTIONS)}")
        scene, traj, video, prompt = example.scene, example.trajectory, example.video, example.prompt
        if kind == "gravity_wrong":
            factor = _choice(generator, (-1.0, -0.5, 3.0))
            new_scene = replace(scene, gravity=scene.gravity * factor)
            traj = simulate(new_scene)
            video = render(scene, traj)
        elif kind == "gravity_zero":
            traj = simulate(replace(scene, gravity=0.0))
            video = render(scene, traj)
        elif kind == "teleport":
            traj = _teleport(scene, traj, generator)
            video = render(scene, traj)
        elif kind == "size_change":
            factor = _choice(generator, (0.45, 1.8))
            ramp = torch.linspace(1.0, factor, scene.num_frames).view(-1, 1)
            traj = Trajectory(traj.positions.clone(), traj.radii * ramp, traj.bounced.clone())
            video = render(scene, traj)
        elif kind == "time_reversal":
            if not bool(traj.bounced[0]):
                raise ValueError("time_reversal needs an example whose first ball bounces; "
                                 "build it with example(seed, require_bounce=True)")
            traj = Trajectory(traj.positions.flip(0), traj.radii.flip(0), traj.bounced.clone())
            video = video.flip(0)
        elif kind == "blur":
            video = _blur(video, sigma=_uniform(generator, 1.2, 2.0))
        elif kind == "noise":
            noise = torch.randn(video.shape, generator=generator) * _uniform(generator, 0.12, 0.25)
            video = (video + noise).clamp(0.0, 1.0)  # stay a valid video by construction
        elif kind == "flicker":
            gains = 1.0 + _uniform(generator, 0.35, 0.6) * torch.tensor([(-1.0) ** f for f in range(len(video))])
            video = (video * gains.view(-1, 1, 1, 1)).clamp(0.0, 1.0)
        elif kind == "wrong_colour":
            ball = scene.balls[0]
            others = [c for c in COLOURS if c not in {b.colour for b in scene.balls}]
            prompt = prompt.replace(f"a {ball.colour} ball", f"a {_choice(generator, others)} ball", 1)
        elif kind == "wrong_direction":
            current = direction_of(scene.balls[0])
            new = _choice(generator, [d for d in DIRECTIONS if d != current])
            prompt = prompt.replace(f"ball {current}", f"ball {new}", 1)
        return ToyExample(video, prompt, scene, traj, corruption=kind, meta=dict(example.meta))


def _teleport(scene: Scene, traj: Trajectory, generator: torch.Generator) -> Trajectory:
    """Jump the first ball by at least a third of the frame at a random frame in the middle of the clip."""
    t = scene.num_frames
    cut = int(torch.randint(t // 4, 3 * t // 4, (), generator=generator))
    r = float(traj.radii[0, 0])
    positions = traj.positions.clone()
    start = positions[cut, 0]
    for _ in range(100):
        target = torch.tensor([_uniform(generator, r, scene.width - r), _uniform(generator, r, scene.height - r)])
        if (target - start).norm() >= min(scene.width, scene.height) / 3:
            break
    offset = target - start
    positions[cut:, 0] = positions[cut:, 0] + offset
    positions[..., 0] = positions[..., 0].clamp(r - 0.5, scene.width - 0.5 - r)
    positions[..., 1] = positions[..., 1].clamp(r - 0.5, scene.height - 0.5 - r)
    return Trajectory(positions, traj.radii.clone(), traj.bounced.clone())


def _blur(video: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of every frame; ``video`` is ``(t, c, h, w)``."""
    radius = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    t, c, h, w = video.shape
    flat = video.reshape(t * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return flat.reshape(t, c, h, w)


class ToyWorldDataset(Dataset):
    """``size`` clean toy-world examples; item ``i`` is generated from seed ``seed + i``.

    Items are ``{"video": Tensor[T, C, H, W], "prompt": str}``, which the default collate batches into
    ``[B, T, C, H, W]`` and a list of prompts; with ``prompts_only`` they are ``{"prompt": str}`` (for online
    methods such as GRPO that generate their own videos). With ``first_frame_image`` every item also carries its
    clip's first frame as ``"image"`` ``[C, H, W]`` (image-to-video: the frame fixes each ball's colour, size and
    position; the model must produce the motion the prompt names), also with ``prompts_only``.
    """

    def __init__(self, world: ToyWorld, size: int, seed: int, prompts_only: bool = False,
                 first_frame_image: bool = False) -> None:
        if size < 1:
            raise ValueError(f"dataset size must be positive, got {size}")
        self.world, self.size, self.seed, self.prompts_only = world, size, seed, prompts_only
        self.first_frame_image = first_frame_image

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of {self.size}")
        example = self.world.example(self.seed + index)
        item = {"prompt": example.prompt} if self.prompts_only else {"video": example.video, "prompt": example.prompt}
        if self.first_frame_image:
            item["image"] = example.video[0].clone()  # (c, h, w)
        return item


# Seeds of the splits are far apart so they never overlap for any reasonable size.
TRAIN_SEED_OFFSET, VAL_SEED_OFFSET, TEST_SEED_OFFSET = 0, 10_000_000, 20_000_000


class ToyWorldDataModule(L.LightningDataModule):
    """Serves clean toy-world videos and prompts for training and validation.

    Args:
        num_frames: frames per video.
        height: frame height.
        width: frame width.
        max_balls: 1 or 2 balls per scene.
        train_size: number of distinct training videos (generated on the fly, so this can be large).
        val_size: number of held-out validation videos.
        batch_size: videos per batch.
        seed: base seed; train, validation and test splits use disjoint seed ranges.
        num_workers: data-loader worker processes.
        prompts_only: serve only prompts (online objectives generate their own videos).
        first_frame_image: also serve each clip's first frame as ``"image"`` (image-to-video).
    """

    def __init__(
        self,
        num_frames: int = 16,
        height: int = 32,
        width: int = 32,
        max_balls: int = 2,
        train_size: int = 100_000,
        val_size: int = 64,
        batch_size: int = 16,
        seed: int = 0,
        num_workers: int = 0,
        prompts_only: bool = False,
        first_frame_image: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.world = ToyWorld(num_frames, height, width, max_balls=max_balls)
        self.train_size, self.val_size, self.batch_size = train_size, val_size, batch_size
        self.seed, self.num_workers, self.prompts_only = seed, num_workers, prompts_only
        self.first_frame_image = first_frame_image

    def train_dataloader(self) -> DataLoader:
        dataset = ToyWorldDataset(self.world, self.train_size, self.seed + TRAIN_SEED_OFFSET, self.prompts_only,
                                  self.first_frame_image)
        generator = torch.Generator().manual_seed(self.seed)
        return ResumableDataLoader(dataset, batch_size=self.batch_size, shuffle=True, generator=generator,
                                   num_workers=self.num_workers, drop_last=True,
                                   persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        dataset = ToyWorldDataset(self.world, self.val_size, self.seed + VAL_SEED_OFFSET, self.prompts_only,
                                  self.first_frame_image)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers)


# -- reading videos back: what a generated toy-world video shows ------------------------------------------------------
@dataclass
class Observation:
    """What a single-ball toy-world video shows, measured from its pixels."""

    colour: str  # nearest palette colour of the foreground
    centroid: Tensor  # (t, 2) x, y of the foreground per frame (NaN where a frame is empty)
    area: Tensor  # (t,) foreground pixels per frame


def observe(video: Tensor, threshold: float = 0.25) -> Observation:
    """Segment the foreground of ``[T, C, H, W]`` against the background colour and measure it per frame."""
    if video.ndim != 4:
        raise ValueError(f"video must have shape [T, C, H, W], got {tuple(video.shape)}")
    diff = (video - torch.tensor(BACKGROUND, device=video.device).view(1, 3, 1, 1)).abs().sum(1)  # (t, h, w)
    mask = (diff > threshold).float()
    area = mask.sum((1, 2))
    ys = torch.arange(video.shape[-2], device=video.device, dtype=torch.float32).view(1, -1, 1)
    xs = torch.arange(video.shape[-1], device=video.device, dtype=torch.float32).view(1, 1, -1)
    cx = (mask * xs).sum((1, 2)) / area
    cy = (mask * ys).sum((1, 2)) / area
    fg = video.permute(1, 0, 2, 3)[:, mask.bool()]  # (3, n)
    mean = fg.mean(1) if fg.shape[1] else torch.zeros(3)
    colour = min(COLOURS, key=lambda c: float((torch.tensor(COLOURS[c]) - mean.cpu()).abs().sum()))
    return Observation(colour, torch.stack([cx, cy], dim=1), area)


def prompt_agreement(video: Tensor, prompt: str) -> dict[str, bool]:
    """Does a single-ball video show what its prompt says? Colour, horizontal direction, and falling under gravity.

    ``falls`` checks that the ball accelerates downwards over the first half of the clip (positive mean second
    difference of its height), which holds for every toy-world trajectory before its first bounce.
    """
    words = prompt.split()
    if prompt.count("ball") != 1 or len(words) < 4:
        raise ValueError(f"prompt_agreement takes single-ball toy-world prompts, got {prompt!r}")
    obs = observe(video)
    x, y = obs.centroid[:, 0], obs.centroid[:, 1]
    half = max(4, video.shape[0] // 2)
    dx = float(x[half - 1] - x[0])
    direction = " ".join(words[3:5]) if words[3] == "moves" else words[3]
    direction_ok = {"falls": abs(dx) < 2.0, "moves left": dx < -1.0, "moves right": dx > 1.0}[direction]
    accel = y[2:half] - 2 * y[1:half - 1] + y[:half - 2]
    return {"colour": obs.colour == words[1], "direction": direction_ok,
            "falls": bool(torch.nan_to_num(accel, nan=-1.0).mean() > 0)}
