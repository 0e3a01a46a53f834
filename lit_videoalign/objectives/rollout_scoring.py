"""Scoring the rollouts of GRPO and DiffusionNFT: chunk by chunk, optionally in the background, and optionally as win
rates (Pref-GRPO, Wang et al., arXiv 2508.20751).

- **Chunks and asynchronous scoring.** A rollout batch is generated ``rollout_chunk_size`` prompts (whole groups) at a
  time. Synchronously each chunk is scored right after it is generated; with ``async_scoring`` chunk ``j`` is scored in
  one background thread while chunk ``j + 1`` is generated, so a slow judge (a large VLM, a reward server) overlaps
  with generation. Both modes run the one loop of :func:`generate_and_score`: the chunks are generated in the same
  order with the same generator and scored by the same function, so they give bit-identical rollouts. The reward must
  not draw from the global torch RNG (the rollouts do); a reward that raises in the thread masks its chunk as a
  synchronous failure does, and is counted (``train/reward_failures``).
- **Win-rate advantages.** With ``advantage: win_rate`` the samples of a group are compared with each other (every
  pair, or ``win_rate_pairs`` seeded random opponents per sample) and each sample's win rate replaces its reward in
  the objective's group standardisation. A :class:`~reward_zoo.pairwise.PairwiseReward` is asked through ``compare``
  (one batched call per chunk); a pointwise reward scores each video once and is read through Bradley-Terry,
  ``P(i beats j) = sigmoid(r_i - r_j)`` (what ``bt_pairwise(reward).score_then_compare`` computes), from the same scores
  that are logged as the raw reward. A win rate is relative to the group, so a judge's drift in absolute scale (the
  usual form of reward hacking) does not move it.

No LightningModule lives here: the objectives call these functions with themselves as ``module``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from reward_zoo.base import RewardModel
from reward_zoo.pairwise import PairwiseReward, comparison_pairs, win_rates

ADVANTAGES = ("reward", "win_rate")


def check_scoring_options(reward: Any, advantage: str, win_rate_pairs: int | None, group_size: int,
                          async_scoring: bool, rollout_chunk_size: int | None, who: str) -> None:
    """Raise a one-line error naming the first bad scoring option of objective ``who``."""
    if advantage not in ADVANTAGES:
        raise ValueError(f"{who} advantage must be one of {ADVANTAGES}, got {advantage!r}")
    pairwise = advantage == "win_rate" and isinstance(reward, PairwiseReward) and isinstance(reward, nn.Module)
    if not (isinstance(reward, RewardModel) or pairwise):
        wanted = "a reward_zoo RewardModel" + (" or PairwiseReward" if advantage == "win_rate" else "")
        raise TypeError(f"reward must be {wanted}, got {type(reward).__name__}")
    if win_rate_pairs is not None and not (isinstance(win_rate_pairs, int) and 1 <= win_rate_pairs < group_size):
        raise ValueError(f"{who} win_rate_pairs must be in [1, group_size - 1] = [1, {group_size - 1}] or null (every "
                         f"pair), got {win_rate_pairs!r}")
    if not isinstance(async_scoring, bool):
        raise TypeError(f"{who} async_scoring must be true or false, got {async_scoring!r}")
    if rollout_chunk_size is not None and not (isinstance(rollout_chunk_size, int) and rollout_chunk_size >= 1):
        raise ValueError(f"{who} rollout_chunk_size must be a positive number of prompts or null (the whole batch), "
                         f"got {rollout_chunk_size!r}")


def reward_dimensions(reward: nn.Module, advantage: str) -> tuple[str, ...]:
    """The scores that can train, ``"overall"`` included: a pairwise judge's dimensions under win rates (it is asked
    through ``compare``, :func:`asks_pairs`), else the reward's ``dimensions``."""
    pairwise = advantage == "win_rate" and asks_pairs(reward)
    return (*(reward.pairwise_dimensions if pairwise else reward.dimensions), "overall")


def chunk_slices(num_prompts: int, group_size: int, chunk_size: int | None) -> list[slice]:
    """The sample ranges of each chunk: ``chunk_size`` prompts (``chunk_size * group_size`` samples) each; None is one
    chunk. Raises unless ``chunk_size`` divides ``num_prompts``."""
    chunk = num_prompts if chunk_size is None else chunk_size
    if num_prompts % chunk:
        raise ValueError(f"rollout_chunk_size={chunk_size} must divide the number of prompts per batch, got a batch of "
                         f"{num_prompts} prompts; use a batch size that is a multiple of it")
    step = chunk * group_size
    return [slice(i, i + step) for i in range(0, num_prompts * group_size, step)]


def pair_generator(module) -> torch.Generator:
    """The generator of the random opponents (``win_rate_pairs``): seeded from the run's seed (``seed_everything``) and
    the optimizer step, so a resumed run draws the same pairs."""
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    return torch.Generator().manual_seed((seed * 1_000_003 + int(module.global_step)) % 2**63)


@dataclass
class Scored:
    """The scores of some rollouts."""

    rewards: dict[str, Tensor]  # per dimension, (n,): the raw scores (a pairwise judge: per-dimension win rates)
    valid: Tensor  # (n,) bool: the training signal is finite
    signal: Tensor  # (n,) what the objective standardises within groups: the reward's key score, or the win rate
    stats: dict[str, float] = field(default_factory=dict)  # logged as train/<name>


def score_chunk(module, videos: Tensor, prompts: list[str], pairs: Tensor | None, key: str,
                references: Tensor | None = None) -> Scored:
    """Score one chunk: ``module.score`` (pointwise, masked on failure; against the samples' conditioning images
    ``references``, if any), then, given comparison ``pairs`` ``[P, 2]``, the win rates. Runs in the scoring thread
    under ``async_scoring``, so it logs nothing."""
    with torch.no_grad():  # grad mode is per thread
        if pairs is None:
            rewards, valid = module.score(videos, prompts, references=references)
            return Scored(rewards, valid, rewards[key])
        start, n = time.perf_counter(), videos.shape[0]
        if asks_pairs(module.reward):
            probs = guarded_compare(module, videos, prompts, pairs, key)
            rewards = {dim: win_rates(p, pairs, n) for dim, p in probs.items()}
        else:
            rewards, _ = module.score(videos, prompts, references=references)
            r = rewards[key]
            probs = {key: torch.sigmoid(r[pairs[:, 0]] - r[pairs[:, 1]])}  # Bradley-Terry; NaN if a reward is
        wins = win_rates(probs[key], pairs, n)
    stats = {"win_rate_comparisons": float(len(pairs)), "win_rate_seconds": time.perf_counter() - start}
    return Scored(rewards, torch.isfinite(wins), wins, stats)


def asks_pairs(reward: nn.Module) -> bool:
    """Whether win rates come from the reward's own ``compare``: a pairwise judge's do; a pointwise reward's, and a
    ``remote`` reward's whose server answers ``/compare`` by Bradley-Terry, come from its scores (the same
    probabilities, with each video scored once instead of once per pair)."""
    if not isinstance(reward, PairwiseReward):
        return False
    served = getattr(reward, "server_info", None)
    bradley_terry = isinstance(served, dict) and served.get("pairwise") == "bradley_terry"
    return not (isinstance(reward, RewardModel) and bradley_terry)


def guarded_compare(module, videos: Tensor, prompts: list[str], pairs: Tensor, key: str) -> dict[str, Tensor]:
    """The held pairwise judge's ``P(i beats j)`` for every row ``(i, j)`` of ``pairs``, in one call; if it raises,
    NaN for every pair (so every sample of the chunk is masked), a warning, and one more ``module.reward_failures``."""
    i, j = pairs[:, 0], pairs[:, 1]
    try:
        probs = module.reward.compare(videos[i], videos[j], [prompts[k] for k in i.tolist()], fps=module.backbone.fps)
        return {dim: p.detach().float() for dim, p in probs.items()}
    except Exception as err:
        module.reward_failures += 1
        rank_zero_warn(f"{type(module).__name__}: the pairwise reward raised {type(err).__name__}: {err}; the samples "
                       f"of this chunk are masked")
        nan = torch.full((len(pairs),), float("nan"), device=videos.device)
        return {"overall": nan, key: nan}


def generate_and_score(module, group_prompts: list[str], generate: Callable[[slice], tuple[Any, Tensor]],
                       key: str, references: Tensor | None = None) -> tuple[list[Any], Scored]:
    """Generate a rollout batch chunk by chunk and score every chunk, in the background under ``async_scoring``.

    Args:
        module: the objective (GRPO or DiffusionNFT): its ``hparams`` (``group_size``, ``rollout_chunk_size``,
            ``async_scoring``, ``advantage``, ``win_rate_pairs``), ``score``, ``reward`` and ``reward_failures``.
        group_prompts: one prompt per sample, group by group.
        generate: ``samples -> (anything, videos [b, T, C, H, W])`` for the samples of a slice; called in chunk order
            in this thread.
        key: the reward's score that trains.
        references: one conditioning image per sample (image-to-video), given to the reward with its chunk.

    Returns:
        What ``generate`` returned for each chunk, in order, and the scores of the whole batch.
    """
    hp = module.hparams
    k, n = hp.group_size, len(group_prompts)
    if n % k:
        raise ValueError(f"{n} samples do not form groups of group_size={k}")
    slices = chunk_slices(n // k, k, hp.rollout_chunk_size)
    win_rate = hp.advantage == "win_rate"
    pairs_from = pair_generator(module) if win_rate and hp.win_rate_pairs is not None else None
    pool = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),)) \
        if hp.async_scoring else None  # the thread computes with this thread's intra-op threads, so bit for bit alike
    outputs, pending = [], []
    try:
        for sl in slices:
            out, videos = generate(sl)
            outputs.append(out)
            pairs = comparison_pairs(sl.stop - sl.start, k, hp.win_rate_pairs, pairs_from) if win_rate else None
            args = (module, videos, group_prompts[sl], pairs, key, None if references is None else references[sl])
            pending.append(pool.submit(score_chunk, *args) if pool is not None else score_chunk(*args))
        waited = time.perf_counter()
        results = [p.result() for p in pending] if pool is not None else pending
        waited = time.perf_counter() - waited
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    scored = merge_scores(results)
    if pool is not None:
        scored.stats["scoring_wait_seconds"] = waited  # what generation could not hide
    return outputs, scored


def merge_scores(parts: list[Scored]) -> Scored:
    """One :class:`Scored` of chunks in order: tensors concatenated (a dimension a failed chunk lacks is NaN there),
    stats summed."""
    dims = list(dict.fromkeys(d for p in parts for d in p.rewards))

    def column(p: Scored, dim: str) -> Tensor:
        return p.rewards[dim] if dim in p.rewards else torch.full_like(p.signal, float("nan"), dtype=torch.float32)

    stats: dict[str, float] = {}
    for p in parts:
        for name, value in p.stats.items():
            stats[name] = stats.get(name, 0.0) + value
    return Scored({d: torch.cat([column(p, d) for p in parts]) for d in dims}, torch.cat([p.valid for p in parts]),
                  torch.cat([p.signal for p in parts]), stats)


def log_scoring(module, stats: dict[str, float], batch_size: int) -> None:
    """Log a rollout batch's scoring stats and the run's count of failed reward calls (``train/reward_failures``)."""
    for name, value in stats.items():
        module.log(f"train/{name}", float(value), batch_size=batch_size)
    module.log("train/reward_failures", float(module.reward_failures), batch_size=batch_size)
