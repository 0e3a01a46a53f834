"""Toy-world preference pairs with per-dimension labels and ties, for reward-model training and preference optimisation.

Every pair shares one prompt (the clean description of a toy-world scene) and holds two videos, each either clean or
damaged by one labelled corruption. Which quality dimensions a corruption damages is fixed by
:data:`CORRUPTION_DIMENSIONS`; the per-dimension label of a pair follows from it:

- physics corruptions (wrong or missing gravity, teleports, size changes, time reversal) damage ``physics`` and
  ``motion``; a size change also breaks ``identity``;
- visual corruptions (blur, noise, flicker) damage ``visual``;
- prompt corruptions damage ``text``: the video shows a scene whose colour or direction contradicts the shared
  prompt (the toy world's ``wrong_colour`` / ``wrong_direction``, applied to the video instead of the prompt);
- ``colour_change`` (added here) switches the first ball's colour mid-clip and damages ``identity`` only.

A pair is labelled, per dimension, ``+1`` (``video_a`` better), ``-1`` (``video_b`` better) or ``0`` (tie: neither or
both videos damaged in that dimension). Pairs come in three kinds: clean against corrupted, two corruptions that
damage different dimensions ("mixed", so each dimension's label disagrees with the others), and ties (two clean
renditions of the same prompt, or two renditions carrying the same corruption). The order of ``a`` and ``b`` is
random. Train, validation and test splits draw their seeds from the disjoint toy-world ranges.
"""

from __future__ import annotations

from dataclasses import replace

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_videoalign.data.resumable import ResumableDataLoader
from lit_videoalign.data.toyworld import (
    COLOURS,
    CORRUPTIONS,
    DIRECTIONS,
    PHYSICS_CORRUPTIONS,
    PROMPT_CORRUPTIONS,
    TEST_SEED_OFFSET,
    TRAIN_SEED_OFFSET,
    VAL_SEED_OFFSET,
    VISUAL_CORRUPTIONS,
    ToyExample,
    ToyWorld,
    describe,
    direction_of,
    render,
    simulate,
)

PAIR_DIMENSIONS = ("visual", "motion", "physics", "text", "identity")
IDENTITY_CORRUPTIONS = ("colour_change",)
PAIR_CORRUPTIONS = CORRUPTIONS + IDENTITY_CORRUPTIONS
CORRUPTION_DIMENSIONS: dict[str, tuple[str, ...]] = {
    **{kind: ("physics", "motion") for kind in PHYSICS_CORRUPTIONS},
    "size_change": ("physics", "motion", "identity"),
    **{kind: ("visual",) for kind in VISUAL_CORRUPTIONS},
    **{kind: ("text",) for kind in PROMPT_CORRUPTIONS},
    "colour_change": ("identity",),
}
SPLIT_OFFSETS = {"train": TRAIN_SEED_OFFSET, "val": VAL_SEED_OFFSET, "test": TEST_SEED_OFFSET}
RENDITION_TRIES = 20  # attempts at a second clean scene with the same prompt before falling back to a duplicate


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _choice(generator: torch.Generator, options):
    options = list(options)
    return options[int(torch.randint(len(options), (), generator=generator))]


def labels_for(kind_a: str | None, kind_b: str | None) -> dict[str, int]:
    """Per-dimension labels of a pair whose videos carry corruptions ``kind_a`` and ``kind_b`` (None: clean).

    ``+1``: only ``b`` is damaged in that dimension (``a`` better); ``-1``: only ``a`` is; ``0``: a tie.
    """
    for kind in (kind_a, kind_b):
        if kind is not None and kind not in CORRUPTION_DIMENSIONS:
            raise ValueError(f"unknown corruption {kind!r}; expected None (clean) or one of {list(PAIR_CORRUPTIONS)}")
    bad_a = set(CORRUPTION_DIMENSIONS.get(kind_a, ()))
    bad_b = set(CORRUPTION_DIMENSIONS.get(kind_b, ()))
    return {dim: int(dim in bad_b) - int(dim in bad_a) for dim in PAIR_DIMENSIONS}


def rendition(world: ToyWorld, example: ToyExample, generator: torch.Generator) -> ToyExample:
    """Another clean video with exactly the same prompt: the scene with jittered start, speed and bounciness.

    Falls back to an exact duplicate if no jittered scene keeps the prompt within a few tries (rare).
    """
    scene = example.scene
    scale = scene.width / 32
    for _ in range(RENDITION_TRIES):
        balls = []
        for ball in scene.balls:
            lo, hi = ball.radius + 1, scene.width - ball.radius - 2
            x = min(max(ball.x + _uniform(generator, -3, 3) * scale, lo), hi)
            y = min(max(ball.y + _uniform(generator, -2, 2) * scale, ball.radius + 1), scene.height / 2)
            balls.append(replace(ball, x=x, y=y, vx=ball.vx * _uniform(generator, 0.8, 1.2),
                                 vy=ball.vy + _uniform(generator, -0.2, 0.2) * scale,
                                 restitution=_uniform(generator, 0.6, 0.85)))
        candidate = world.make(replace(scene, balls=tuple(balls)))
        if candidate.prompt == example.prompt:
            return candidate
    return ToyExample(example.video.clone(), example.prompt, example.scene, example.trajectory)


def colour_change(example: ToyExample, generator: torch.Generator) -> ToyExample:
    """The first ball switches to another palette colour at a random frame in the middle of the clip."""
    scene, traj = example.scene, example.trajectory
    t = scene.num_frames
    cut = int(torch.randint(t // 4, 3 * t // 4, (), generator=generator))
    used = {ball.colour for ball in scene.balls}
    new = _choice(generator, [c for c in COLOURS if c not in used])
    recoloured = replace(scene, balls=(replace(scene.balls[0], colour=new), *scene.balls[1:]))
    video = torch.cat([example.video[:cut], render(recoloured, traj)[cut:]])  # (t, c, h, w)
    return ToyExample(video, example.prompt, scene, traj, corruption="colour_change", meta={"cut": cut})


def text_mismatch(example: ToyExample, kind: str, generator: torch.Generator) -> ToyExample:
    """A clean, physically correct video whose first ball has another colour or direction than the prompt says.

    The returned example keeps the original prompt (the one the pair shares); the video shows the scene the toy
    world's prompt corruption ``kind`` would describe.
    """
    scene = example.scene
    ball = scene.balls[0]
    if kind == "wrong_colour":
        used = {b.colour for b in scene.balls}
        new_ball = replace(ball, colour=_choice(generator, [c for c in COLOURS if c not in used]))
    elif kind == "wrong_direction":
        current = direction_of(ball)
        new = _choice(generator, [d for d in DIRECTIONS if d != current])
        speed = abs(ball.vx) if ball.vx != 0 else _uniform(generator, 0.6, 1.4) * scene.width / 32
        lo, hi = ball.radius + 1, scene.width - ball.radius - 2
        mirrored = lo + hi - ball.x
        x = {"falls": ball.x, "moves left": max(ball.x, mirrored), "moves right": min(ball.x, mirrored)}[new]
        vx = {"falls": 0.0, "moves left": -speed, "moves right": speed}[new]
        new_ball = replace(ball, x=x, vx=vx)
    else:
        raise ValueError(f"text_mismatch takes one of {list(PROMPT_CORRUPTIONS)}, got {kind!r}")
    new_scene = replace(scene, balls=(new_ball, *scene.balls[1:]))
    traj = simulate(new_scene)
    return ToyExample(render(new_scene, traj), example.prompt, new_scene, traj, corruption=kind,
                      meta={"shows": describe(new_scene, traj)})


def apply_corruption(world: ToyWorld, example: ToyExample, kind: str, generator: torch.Generator) -> ToyExample:
    """``example`` damaged by ``kind`` (any of :data:`PAIR_CORRUPTIONS`), keeping the prompt the pair shares."""
    if kind in PROMPT_CORRUPTIONS:
        return text_mismatch(example, kind, generator)
    if kind == "colour_change":
        return colour_change(example, generator)
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; expected one of {list(PAIR_CORRUPTIONS)}")
    return world.corrupt(example, kind, generator)


class ToyWorldPairs(Dataset):
    """``size`` labelled preference pairs; pair ``i`` is generated from seed ``seed + i`` (deterministic).

    Items are ``{"prompt": str, "video_a": Tensor[T, C, H, W], "video_b": Tensor[T, C, H, W],
    "labels": {dim: int in {+1, -1, 0}}, "tie": bool, "kind_a": str, "kind_b": str, "seed": int}``; ``kind_*`` is
    ``"clean"`` or the corruption name, ``tie`` is True when every dimension is tied. The default collate batches
    them into ``[B, T, C, H, W]`` videos, a list of prompts and ``{dim: LongTensor[B]}`` labels.

    Args:
        world: the toy world that renders the videos.
        size: number of pairs.
        seed: seed of pair 0.
        corruptions: the corruptions pairs draw from (default: all of :data:`PAIR_CORRUPTIONS`).
        tie_prob: fraction of tied pairs (two clean renditions, or two renditions with the same corruption).
        mixed_prob: fraction of pairs whose two videos carry corruptions damaging different dimensions.
    """

    def __init__(
        self,
        world: ToyWorld,
        size: int,
        seed: int,
        corruptions: list[str] | tuple[str, ...] | None = None,
        tie_prob: float = 0.2,
        mixed_prob: float = 0.2,
    ) -> None:
        if size < 1:
            raise ValueError(f"dataset size must be positive, got {size}")
        corruptions = tuple(PAIR_CORRUPTIONS if corruptions is None else corruptions)
        unknown = [c for c in corruptions if c not in PAIR_CORRUPTIONS]
        if unknown or not corruptions:
            raise ValueError(f"corruptions must be a non-empty subset of {list(PAIR_CORRUPTIONS)}, got "
                             f"{list(corruptions)}")
        if not (0 <= tie_prob <= 1 and 0 <= mixed_prob <= 1 and tie_prob + mixed_prob <= 1):
            raise ValueError(f"tie_prob and mixed_prob must be in [0, 1] and sum to at most 1, got tie_prob="
                             f"{tie_prob}, mixed_prob={mixed_prob}")
        self.world, self.size, self.seed = world, size, seed
        self.corruptions, self.tie_prob, self.mixed_prob = corruptions, tie_prob, mixed_prob

    def __len__(self) -> int:
        return self.size

    def _mixed_kinds(self, generator: torch.Generator) -> tuple[str, str] | None:
        """Two corruptions that damage different sets of dimensions, or None if the mix offers none."""
        first = _choice(generator, self.corruptions)
        others = [c for c in self.corruptions if CORRUPTION_DIMENSIONS[c] != CORRUPTION_DIMENSIONS[first]]
        return (first, _choice(generator, others)) if others else None

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of {self.size} pairs")
        seed = self.seed + index
        g = torch.Generator().manual_seed(seed)
        u = torch.rand((), generator=g).item()
        if u < self.tie_prob:  # a tie: two renditions, both clean or both with the same corruption
            kind = None if torch.rand((), generator=g).item() < 0.5 else _choice(g, self.corruptions)
            kinds = (kind, kind)
        elif u < self.tie_prob + self.mixed_prob and (mixed := self._mixed_kinds(g)) is not None:
            kinds = mixed
        else:
            kinds = (None, _choice(g, self.corruptions))
        clean = self.world.example(seed, require_bounce="time_reversal" in kinds)
        bases = (clean, rendition(self.world, clean, g) if kinds[0] == kinds[1] else clean)
        videos = [b.video if k is None else apply_corruption(self.world, b, k, g).video for b, k in zip(bases, kinds)]
        if torch.rand((), generator=g).item() < 0.5:  # random order
            videos, kinds = videos[::-1], kinds[::-1]
        labels = labels_for(*kinds)
        return {"prompt": clean.prompt, "video_a": videos[0], "video_b": videos[1], "labels": labels,
                "tie": all(v == 0 for v in labels.values()), "kind_a": kinds[0] or "clean",
                "kind_b": kinds[1] or "clean", "seed": seed}


class ToyWorldPairsDataModule(L.LightningDataModule):
    """Serves :class:`ToyWorldPairs` for reward-model training (``reward_zoo.training``) and preference optimisation.

    Args:
        num_frames: frames per video.
        height: frame height.
        width: frame width.
        max_balls: 1 or 2 balls per scene.
        train_size: number of distinct training pairs (generated on the fly, so this can be large).
        val_size: validation pairs (also used to calibrate the tie threshold of accuracy-with-ties).
        test_size: held-out test pairs, reported in model cards.
        batch_size: pairs per batch.
        seed: base seed; train, validation and test use the disjoint toy-world seed ranges.
        corruptions: corruptions the pairs draw from (default all of ``PAIR_CORRUPTIONS``).
        tie_prob: fraction of tied pairs.
        mixed_prob: fraction of pairs with two different corruptions.
        num_workers: data-loader worker processes.
    """

    def __init__(
        self,
        num_frames: int = 16,
        height: int = 32,
        width: int = 32,
        max_balls: int = 2,
        train_size: int = 100_000,
        val_size: int = 256,
        test_size: int = 512,
        batch_size: int = 16,
        seed: int = 0,
        corruptions: list[str] | None = None,
        tie_prob: float = 0.2,
        mixed_prob: float = 0.2,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.save_hyperparameters()
        self.world = ToyWorld(num_frames, height, width, max_balls=max_balls)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.pair_kwargs = {"corruptions": corruptions, "tie_prob": tie_prob, "mixed_prob": mixed_prob}
        self.dataset("train")  # validate the arguments now, not at the first batch

    def dataset(self, split: str) -> ToyWorldPairs:
        """The pairs of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        if split not in SPLIT_OFFSETS:
            raise ValueError(f"split must be one of {list(SPLIT_OFFSETS)}, got {split!r}")
        return ToyWorldPairs(self.world, self.sizes[split], self.seed + SPLIT_OFFSETS[split], **self.pair_kwargs)

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(self.dataset("train"), batch_size=self.batch_size, shuffle=True,
                                   generator=torch.Generator().manual_seed(self.seed), num_workers=self.num_workers,
                                   drop_last=True, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("val"), batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("test"), batch_size=self.batch_size, num_workers=self.num_workers)

    def describe(self) -> str:
        """One paragraph describing the data, for model cards."""
        w = self.world
        corruptions = self.pair_kwargs["corruptions"] or list(PAIR_CORRUPTIONS)
        return (f"Toy-world preference pairs (`lit_videoalign.data.toyworld_pairs.ToyWorldPairsDataModule`): "
                f"{w.num_frames}x{w.height}x{w.width} procedural videos of up to {w.max_balls} balls under gravity, "
                f"clean vs corrupted with per-dimension labels; corruptions {', '.join(corruptions)}; "
                f"tie fraction {self.pair_kwargs['tie_prob']}, mixed-corruption fraction "
                f"{self.pair_kwargs['mixed_prob']}; train seeds from {self.seed + TRAIN_SEED_OFFSET} "
                f"(up to {self.sizes['train']} pairs), validation {self.sizes['val']} pairs from seed "
                f"{self.seed + VAL_SEED_OFFSET}, test {self.sizes['test']} pairs from seed "
                f"{self.seed + TEST_SEED_OFFSET} (disjoint ranges).")


def collate_check(batch: dict) -> tuple[Tensor, Tensor]:
    """The ``(video_a, video_b)`` tensors of a collated batch, each ``[B, T, C, H, W]``; raises on a bad batch."""
    for key in ("video_a", "video_b", "labels"):
        if key not in batch:
            raise KeyError(f"a preference-pair batch needs {key!r}; got keys {sorted(batch)}")
    if batch["video_a"].shape != batch["video_b"].shape:
        raise ValueError(f"video_a and video_b must have the same shape, got {tuple(batch['video_a'].shape)} and "
                         f"{tuple(batch['video_b'].shape)}")
    return batch["video_a"], batch["video_b"]


__all__ = [
    "CORRUPTION_DIMENSIONS",
    "IDENTITY_CORRUPTIONS",
    "PAIR_CORRUPTIONS",
    "PAIR_DIMENSIONS",
    "ToyWorldPairs",
    "ToyWorldPairsDataModule",
    "apply_corruption",
    "colour_change",
    "labels_for",
    "rendition",
    "text_mismatch",
]
