"""Reward evaluation of generated videos: per-dimension tables, win rates with confidence intervals, plots.

Used by ``videoalign evaluate`` and by the :class:`~lit_videoalign.callbacks.reward_evaluation.RewardEvaluation`
callback. Rewards come from the ``reward_zoo`` by name, ``hf-hub:org/repo`` or folder; every score is "higher is
better", so a model *wins* a pair when its video scores higher than the other model's video for the same prompt and
seed. Win rates count a tie (``|a - b| <= tie_tolerance``) as half a win, and carry a 95 % interval: Wilson's score
interval (Wilson 1927) on ``wins + ties / 2`` successes out of ``n`` pairs, or a paired percentile bootstrap.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_videoalign.video_io import MANIFEST

# Toy-world defaults: the rewards a toy-world objective typically trains on, and held-out "gold" rewards it does not.
DEFAULT_EVAL_REWARDS = ("newton", "quality", "dynamic_degree")
DEFAULT_GOLD_REWARDS = ("physics_learned", "subject_consistency", "flicker")
DEFAULT_REWARDS = (*DEFAULT_EVAL_REWARDS, *DEFAULT_GOLD_REWARDS)
Z_95 = 1.959963984540054  # standard normal quantile of 0.975


# -- rewards --------------------------------------------------------------------------------------------------------
def reward_key(name_or_hub_id: str) -> str:
    """A short name for a reward spec: ``"hf-hub:org/repo"`` -> ``"repo"``, ``"path/to/folder"`` -> ``"folder"``."""
    return Path(name_or_hub_id.split(":", 1)[-1].rstrip("/")).name


def build_rewards(spec: Mapping[str, Any] | Sequence[str] | None, default: Sequence[str] = ()) -> dict[str, Any]:
    """Rewards by name: a dict ``name -> RewardModel`` is returned as is; a list of registered names, Hub ids
    (``hf-hub:org/repo``) or folders is built with ``reward_zoo.create_reward``, loading a registered name's shipped
    weights when they exist (``pretrained=True``). Every reward is frozen and in eval mode.
    """
    from reward_zoo import RewardModel, create_reward, registry

    spec = list(default) if spec is None else spec
    if isinstance(spec, str):
        raise TypeError(f"rewards must be a list of names or a dict of rewards, got the string {spec!r}")
    if isinstance(spec, Mapping):
        rewards = dict(spec)
    else:
        rewards = {}
        for item in spec:
            if not isinstance(item, str):
                raise TypeError(f"reward names must be strings, got {item!r}")
            is_name = not item.startswith(registry.HUB_PREFIX) and not Path(item).is_dir()
            pretrained = is_name and (registry.PRETRAINED_DIR / item / "config.json").is_file()
            key = reward_key(item)
            if key in rewards:
                raise ValueError(f"two rewards are both called {key!r}; pass a dict name -> reward instead")
            rewards[key] = create_reward(item, pretrained=pretrained)
    for name, reward in rewards.items():
        if not isinstance(reward, RewardModel):
            raise TypeError(f"reward {name!r} must be a reward_zoo RewardModel, got {type(reward).__name__}")
        if "/" in name or "." in name or not name:
            raise ValueError(f"reward names must be non-empty and contain no '/' or '.', got {name!r}")
        reward.requires_grad_(False).eval()
    return rewards


@torch.no_grad()
def score_videos(rewards: Mapping[str, Any], videos: Tensor, prompts: Sequence[str],
                 batch_size: int = 16, fps: float | None = None,
                 rationales: list[dict[str, list[str]]] | None = None) -> list[dict[str, float]]:
    """Score ``videos [B, T, C, H, W]`` in ``[0, 1]`` with every reward; one row ``{"reward/dimension": score}`` per
    video, ``overall`` first for each reward (a reward whose only dimension equals its overall gives ``overall``
    alone). ``fps`` is the videos' frame rate, for rewards that sample frames by time. Given ``rationales`` (one dict
    per video), a judge that writes its reasoning (``last_rationales``, e.g. ``vlm_judge`` with chain of thought) adds
    each video's rationales under the reward's name."""
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {videos.shape[0]} videos; expected one prompt per video")
    rows: list[dict[str, float]] = [{} for _ in range(videos.shape[0])]
    for name, reward in rewards.items():
        tensors = [*reward.parameters(), *reward.buffers()]
        device = tensors[0].device if tensors else videos.device
        for start in range(0, videos.shape[0], batch_size):
            chunk = videos[start:start + batch_size].to(device).contiguous()
            scores = reward(chunk, list(prompts[start:start + batch_size]), fps=fps)
            dims = [d for d in scores if d != "overall"]
            if len(dims) == 1 and torch.equal(scores[dims[0]], scores["overall"]):
                dims = []  # a one-dimension reward: its dimension is its overall, listed once
            for dim in ("overall", *dims):
                for i, value in enumerate(scores[dim].float().cpu().tolist()):
                    rows[start + i][f"{name}/{dim}"] = value
            said = getattr(reward, "last_rationales", None) or []  # video-major: len(chunk) x questions per video
            if rationales is not None and said and len(said) % len(chunk) == 0:
                per_video = len(said) // len(chunk)
                for i in range(len(chunk)):
                    rationales[start + i][name] = list(said[i * per_video:(i + 1) * per_video])
    return rows


# -- statistics -----------------------------------------------------------------------------------------------------
def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n`` (fractional successes allowed)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the interval always holds p; min/max only absorb rounding (e.g. 1 - 1e-16 at p = 1)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def bootstrap_interval(values: Sequence[float] | Tensor, confidence: float = 0.95, num_resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (seeded, so tables are reproducible)."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.numel(), (num_resamples, x.numel()), generator=g)
    means = x[idx].mean(1)
    alpha = (1 - confidence) / 2
    return float(torch.quantile(means, alpha)), float(torch.quantile(means, 1 - alpha))


def win_rate(a: Sequence[float], b: Sequence[float], tie_tolerance: float = 0.0, ci: str = "wilson",
             seed: int = 0) -> dict[str, float]:
    """How often ``a`` beats ``b`` over paired scores: wins, losses, ties, ``win_rate = (wins + ties / 2) / n`` and
    its 95 % interval (``ci="wilson"`` or ``"bootstrap"``, a percentile bootstrap over pairs)."""
    x, y = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if x.shape != y.shape or x.ndim != 1 or x.numel() == 0:
        raise ValueError(f"a and b must be equally long non-empty 1-D score lists, got shapes {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    diff = x - y
    tie = diff.abs() <= tie_tolerance
    wins, losses, ties = int(((diff > 0) & ~tie).sum()), int(((diff < 0) & ~tie).sum()), int(tie.sum())
    n = x.numel()
    outcome = (diff > 0).double() * (~tie).double() + 0.5 * tie.double()  # 1 win, 0.5 tie, 0 loss per pair
    rate = float(outcome.mean())
    if ci == "wilson":
        low, high = wilson_interval(wins + 0.5 * ties, n)
    elif ci == "bootstrap":
        low, high = bootstrap_interval(outcome, seed=seed)
    else:
        raise ValueError(f"ci must be 'wilson' or 'bootstrap', got {ci!r}")
    return {"n": n, "wins": wins, "losses": losses, "ties": ties, "win_rate": rate, "ci_low": low, "ci_high": high}


# -- video sets -----------------------------------------------------------------------------------------------------
@dataclass
class VideoSet:
    """Videos of one model with their prompts (and seeds, when known), ready to score.

    Attributes:
        name: label in tables and plots.
        videos: ``[B, T, C, H, W]`` in ``[0, 1]``.
        prompts: one per video.
        seeds: one per video, or None.
        files: where the videos are on disk, if anywhere.
        fps: the videos' frame rate (from the files, or the generator's), or None when unknown.
    """

    name: str
    videos: Tensor
    prompts: list[str]
    seeds: list[int] | None = None
    files: list[str] = field(default_factory=list)
    fps: float | None = None

    def keys(self) -> list[tuple]:
        """Pairing keys: ``(prompt, seed)``, or ``(prompt, occurrence)`` without seeds."""
        if self.seeds is not None:
            return list(zip(self.prompts, self.seeds))
        seen: dict[str, int] = {}
        keys = []
        for p in self.prompts:
            keys.append((p, seen.get(p, 0)))
            seen[p] = seen.get(p, 0) + 1
        return keys


def read_video_folder(root: str | Path, name: str | None = None, num_frames: int | None = None) -> VideoSet:
    """Read a folder of videos with a ``metadata.jsonl`` manifest (what ``videoalign generate`` writes).

    Each line is ``{"file_name": ..., "prompt": ...}`` with optional ``"seed"`` and ``"upscale"`` (a nearest-neighbour
    factor the file was written with for viewing; it is undone by average pooling so rewards see the generated size).
    All videos must decode to the same shape.
    """
    import torch.nn.functional as F

    from lit_videoalign.video_io import check_video_files, read_manifest, read_video

    root = Path(root)
    listed = read_manifest(root)  # checked lines, paths inside root; a generate folder's GIF previews are not listed
    manifest, entries = root / MANIFEST, [entry for _, entry in listed]
    has_seeds = all("seed" in e for e in entries)
    paths = [path for path, _ in listed]
    infos = check_video_files(paths, num_frames, decode=False, what=f"videos of {manifest}")  # all bad files at once
    rates = sorted({info.fps for info in infos if info.fps is not None})
    if len(rates) > 1:
        raise ValueError(f"the videos of {manifest} have different frame rates {rates} (fps); every video of a set "
                         "must have the same, so that rewards sampling frames by time see one rate")
    videos, files = [], []
    for path, entry in zip(paths, entries):
        video = read_video(path, num_frames=num_frames)  # (t, c, h, w)
        k = int(entry.get("upscale", 1))
        if k > 1:
            video = F.avg_pool2d(video, k)
        if videos and video.shape != videos[0].shape:
            raise ValueError(f"{path} decodes to shape {tuple(video.shape)} but {files[0]} to "
                             f"{tuple(videos[0].shape)}; every video of a set must have the same size and length "
                             "(pass num_frames to cut them)")
        videos.append(video)
        files.append(str(path))
    return VideoSet(name=name or root.name, videos=torch.stack(videos).clamp(0, 1),
                    prompts=[e["prompt"] for e in entries],
                    seeds=[int(e["seed"]) for e in entries] if has_seeds else None, files=files,
                    fps=rates[0] if rates else None)


def write_manifest(folder: str | Path, entries: Sequence[dict]) -> Path:
    """Write ``metadata.jsonl`` (one JSON object per line) into ``folder``."""
    path = Path(folder) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


# -- tables ---------------------------------------------------------------------------------------------------------
def summarize(name: str, rows: Sequence[Mapping[str, float]], seed: int = 0) -> list[dict[str, Any]]:
    """Per-dimension table of one model: ``model, reward, dimension, n, mean, std, ci_low, ci_high`` (bootstrap)."""
    out = []
    for column in rows[0]:
        values = [r[column] for r in rows]
        x = torch.tensor(values, dtype=torch.float64)
        low, high = bootstrap_interval(x, seed=seed)
        reward, dim = column.split("/", 1)
        out.append({"model": name, "reward": reward, "dimension": dim, "n": len(values), "mean": float(x.mean()),
                    "std": float(x.std(unbiased=False)), "ci_low": low, "ci_high": high})
    return out


def paired_win_rates(model: VideoSet, model_rows: Sequence[Mapping[str, float]], baseline: VideoSet,
                     baseline_rows: Sequence[Mapping[str, float]], tie_tolerance: float = 0.0,
                     ci: str = "wilson") -> list[dict[str, Any]]:
    """Win rate of ``model`` over ``baseline`` for every ``reward/dimension``, pairing videos by prompt and seed."""
    if (model.seeds is None) != (baseline.seeds is None):
        raise ValueError("only one of the two video sets has seeds; pair them by giving both or neither seeds")
    index = {key: i for i, key in enumerate(baseline.keys())}
    keys = model.keys()
    missing = [k for k in keys if k not in index]
    if missing or len(keys) != len(index):
        raise ValueError(f"the videos of {model.name!r} and {baseline.name!r} must be the same prompts and seeds; "
                         f"e.g. {missing[:3] or sorted(set(index) - set(keys))[:3]} is in only one of them")
    order = [index[k] for k in keys]
    out = []
    for column in model_rows[0]:
        if column not in baseline_rows[0]:
            continue
        a = [r[column] for r in model_rows]
        b = [baseline_rows[j][column] for j in order]
        reward, dim = column.split("/", 1)
        out.append({"model": model.name, "baseline": baseline.name, "reward": reward, "dimension": dim,
                    **win_rate(a, b, tie_tolerance=tie_tolerance, ci=ci)})
    return out


def write_rows(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write a list of flat dicts as ``.json`` (a list) or ``.csv`` (columns of the first row)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(list(rows), indent=2) + "\n")
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(f"table files must end in .json or .csv, got {path}")
    return path


def markdown_table(summary: Sequence[Mapping[str, Any]], win_rates: Sequence[Mapping[str, Any]] = ()) -> str:
    """The summary (and win rates) as one Markdown table: a row per reward dimension, a column per model."""
    models = list(dict.fromkeys(r["model"] for r in summary))
    wins = {(w["reward"], w["dimension"]): w for w in win_rates}
    header = ["reward", "dimension", *models]
    if wins:
        first = next(iter(wins.values()))
        header.append(f"win rate {first['model']} vs {first['baseline']} (95% CI)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cells = {(r["model"], r["reward"], r["dimension"]): r for r in summary}
    for reward, dim in dict.fromkeys((r["reward"], r["dimension"]) for r in summary):
        row = [reward, dim]
        for m in models:
            c = cells.get((m, reward, dim))
            row.append("" if c is None else f"{c['mean']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}]")
        if wins:
            w = wins.get((reward, dim))
            row.append("" if w is None else f"{w['win_rate']:.2f} [{w['ci_low']:.2f}, {w['ci_high']:.2f}]")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# -- plots ----------------------------------------------------------------------------------------------------------
def plot_summary(summary: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Bar chart of mean scores with 95 % intervals: one panel per reward (scales differ), a bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = list(dict.fromkeys(r["reward"] for r in summary))
    models = list(dict.fromkeys(r["model"] for r in summary))
    fig, axes = plt.subplots(1, len(rewards), figsize=(3.2 * len(rewards), 3.4), squeeze=False)
    width = 0.8 / len(models)
    for ax, reward in zip(axes[0], rewards):
        dims = list(dict.fromkeys(r["dimension"] for r in summary if r["reward"] == reward))
        for j, model in enumerate(models):
            rows = {r["dimension"]: r for r in summary if r["reward"] == reward and r["model"] == model}
            xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(dims))]
            means = [rows[d]["mean"] if d in rows else math.nan for d in dims]
            err = [[max(0.0, rows[d]["mean"] - rows[d]["ci_low"]) if d in rows else 0 for d in dims],
                   [max(0.0, rows[d]["ci_high"] - rows[d]["mean"]) if d in rows else 0 for d in dims]]
            ax.bar(xs, means, width, yerr=err, capsize=2, label=model)
        ax.set_xticks(range(len(dims)), dims, rotation=30, ha="right", fontsize=8)
        ax.set_title(reward, fontsize=10)
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("mean reward per dimension (95% bootstrap CI)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_win_rates(win_rates: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Horizontal bars of win rates with their intervals; the dashed line at 0.5 is "no difference"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{w['reward']}/{w['dimension']}" for w in win_rates]
    rates = [w["win_rate"] for w in win_rates]
    err = [[max(0.0, w["win_rate"] - w["ci_low"]) for w in win_rates],
           [max(0.0, w["ci_high"] - w["win_rate"]) for w in win_rates]]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(labels) + 1.4))
    ys = list(range(len(labels)))[::-1]
    colours = ["tab:green" if w["ci_low"] > 0.5 else "tab:red" if w["ci_high"] < 0.5 else "tab:gray"
               for w in win_rates]
    ax.barh(ys, rates, color=colours, alpha=0.6)
    ax.errorbar(rates, ys, xerr=err, fmt="o", color="black", markersize=3, capsize=2)  # visible even at 0
    ax.set_yticks(ys, labels, fontsize=8)
    ax.axvline(0.5, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlim(0, 1)
    first = win_rates[0] if win_rates else {"model": "model", "baseline": "baseline"}
    ax.set_title(f"{first['model']} vs {first['baseline']}: win rate per reward", fontsize=10)
    ax.set_xlabel("win rate (ties count 1/2), 95% CI; green/red: significantly above/below 0.5", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the whole evaluation -------------------------------------------------------------------------------------------
def evaluate_sets(sets: Sequence[VideoSet], rewards: Mapping[str, Any], output_dir: str | Path,
                  tie_tolerance: float = 0.0, ci: str = "wilson") -> dict[str, Any]:
    """Score one or two video sets and write the tables and plots into ``output_dir``.

    Writes ``scores.{json,csv}`` (one row per video), ``summary.{json,csv}`` (mean and 95 % CI per model, reward and
    dimension), ``summary.md`` and ``rewards.png``; with two sets also ``win_rates.{json,csv}`` and
    ``win_rates.png`` (the first set against the second).

    Returns:
        ``{"scores", "summary", "win_rates", "files"}``.
    """
    if not 1 <= len(sets) <= 2:
        raise ValueError(f"evaluate takes one or two video sets, got {len(sets)}")
    if len(sets) == 2 and sets[0].name == sets[1].name:
        raise ValueError(f"the two video sets need different names, both are {sets[0].name!r}")
    out = Path(output_dir)
    per_video, summary, all_rows = [], [], {}
    for vs in sets:
        rows = score_videos(rewards, vs.videos, vs.prompts, fps=vs.fps)
        all_rows[vs.name] = rows
        summary += summarize(vs.name, rows)
        for i, row in enumerate(rows):
            per_video.append({"model": vs.name, "video": vs.files[i] if vs.files else "", "prompt": vs.prompts[i],
                              "seed": "" if vs.seeds is None else vs.seeds[i], **row})
    wins = []
    if len(sets) == 2:
        wins = paired_win_rates(sets[0], all_rows[sets[0].name], sets[1], all_rows[sets[1].name],
                                tie_tolerance=tie_tolerance, ci=ci)
    files = [write_rows(per_video, out / "scores.json"), write_rows(per_video, out / "scores.csv"),
             write_rows(summary, out / "summary.json"), write_rows(summary, out / "summary.csv"),
             plot_summary(summary, out / "rewards.png")]
    (out / "summary.md").write_text(markdown_table(summary, wins) + "\n")
    files.append(out / "summary.md")
    if wins:
        files += [write_rows(wins, out / "win_rates.json"), write_rows(wins, out / "win_rates.csv"),
                  plot_win_rates(wins, out / "win_rates.png")]
    return {"scores": per_video, "summary": summary, "win_rates": wins, "files": files}


def print_evaluation(result: dict) -> None:
    """The per-dimension table (and win rates) as a Rich table, then the written files."""
    from rich.console import Console
    from rich.table import Table

    summary, wins = result["summary"], result["win_rates"]
    models = list(dict.fromkeys(r["model"] for r in summary))
    table = Table(title="reward per dimension: mean [95% CI]")
    for column in ("reward", "dimension", *models):
        table.add_column(column)
    if wins:
        table.add_column(f"win rate {wins[0]['model']} vs {wins[0]['baseline']} [95% CI]")
    cells = {(r["model"], r["reward"], r["dimension"]): r for r in summary}
    by_dim = {(w["reward"], w["dimension"]): w for w in wins}
    for reward, dim in dict.fromkeys((r["reward"], r["dimension"]) for r in summary):
        row = [reward, dim]
        for m in models:
            c = cells.get((m, reward, dim))
            row.append("" if c is None else f"{c['mean']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}]")
        if wins:
            w = by_dim.get((reward, dim))
            row.append("" if w is None else f"{w['win_rate']:.2f} [{w['ci_low']:.2f}, {w['ci_high']:.2f}]")
        table.add_row(*row)
    console = Console()
    console.print(table)
    for path in result["files"]:
        console.print(f"wrote {path}")
