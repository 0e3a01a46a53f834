"""Peer check against flow_grpo: its SDE step with log-probability and its group advantages, side by side with ours.

    VIDEOALIGN_PEERS_ROOT=/work/peers python -m benchmarks.peers_flow_grpo [--flow_grpo_root DIR] [--repeats 200]
        [--threads 1] [--quick] [--output benchmarks/results/peers_flow_grpo]

flow_grpo (github.com/yifan123/flow_grpo, MIT) is imported at run time from its source tree
(``--flow_grpo_root``, default ``$VIDEOALIGN_PEERS_ROOT/src/flow_grpo`` with ``VIDEOALIGN_PEERS_ROOT`` defaulting to
``/work/peers``); nothing of it is copied into this repository. Two of its functions are importable and compared:

- ``flow_grpo.diffusers_patch.sd3_sde_with_logprob.sde_step_with_logprob`` against
  :func:`lit_videoalign.schedules.flow.sde_step_with_logprob`, on the same video latents, velocities, sigmas (our
  ``sampling_sigmas(10, shift=3)``, every step including the first from sigma = 1 and the last to sigma = 0) and
  ``prev_sample``: max abs difference of the mean, the std and the log-prob, plus the sampling path with the same
  seed, bf16 inputs, and the CPU time per call of each (median over repetitions, the two interleaved);
- ``flow_grpo.stat_tracking.PerPromptStatTracker.update`` against
  :func:`lit_videoalign.objectives.grpo.group_advantages` on the same random rewards.

Its clipped GRPO loss (and KL term) is inline in ``main()`` of ``scripts/train_sd3.py``, so it cannot be imported and
is not compared (re-implementing it here would compare us with ourselves). Every shim this harness needs to call
flow_grpo's step is listed in :data:`SHIMS` and written into the results. When the source tree (or diffusers) is
missing, the results say "could not run: ..." and the module still exits 0.
Writes ``benchmarks/results/peers_flow_grpo.{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import write_result
from lit_videoalign.objectives.grpo import group_advantages
from lit_videoalign.schedules.flow import sampling_sigmas, sde_step_with_logprob

RESULTS = Path(__file__).resolve().parent / "results"
PEERS_ROOT = Path(os.environ.get("VIDEOALIGN_PEERS_ROOT", "/work/peers"))
UPSTREAM = "https://github.com/yifan123/flow_grpo"
STEP_MODULE = "flow_grpo.diffusers_patch.sd3_sde_with_logprob"
TRACKER_MODULE = "flow_grpo.stat_tracking"
NOISE_LEVEL = 0.7  # both defaults (flow_grpo's config/base.py: sample.noise_level = 0.7)

SETUP = [
    f"git clone {UPSTREAM} {{root}} (or `git archive` of a snapshot of it; this run's source was extracted from a "
    "snapshot at the commit below: three training-data files, dataset/geneval/train_metadata.jsonl, "
    "dataset/geneval_unseen_objects/train_metadata.jsonl and dataset/ocr/train.txt, were absent from it and are not "
    "used here)",
    "echo <commit sha> > {root}/COMMIT (read into the results when the tree is not a git checkout)",
    "no install: this suite's environment already has what the two imported modules need (torch, numpy, diffusers)",
]

SHIMS = [
    "scheduler: flow_grpo's step takes a diffusers FlowMatchEulerDiscreteScheduler as `self`; the harness builds "
    "`FlowMatchEulerDiscreteScheduler(shift=1.0)` and calls `set_timesteps(sigmas=ours[:-1])` with our grid "
    "`sampling_sigmas(10, shift=3)` (shift 1.0 so the grid is not shifted twice); diffusers appends the terminal 0, "
    "so `scheduler.sigmas` equals our grid exactly (checked, max abs diff recorded) and `scheduler.timesteps` is "
    "1000 x sigma. Step i is called with `timestep = scheduler.timesteps[i]` per sample (flow_grpo finds the index by "
    "exact equality, then uses sigmas[i] and sigmas[i + 1]).",
    "5-D -> 4-D view: flow_grpo reshapes sigma to `view(-1, 1, 1, 1)`, i.e. image latents [B, C, H, W] only; video "
    "latents [B, C, T, H, W] are passed as the view [B, C*T, H, W] and its outputs viewed back. This is exact: the "
    "step is elementwise and the log-prob is a mean over every non-batch element either way (a direct 5-D call is "
    "probed below).",
    "std: flow_grpo returns `std_dev_t` (the SDE's diffusion coefficient, a * sqrt(sigma / (1 - sigma))), ours "
    "returns the step's standard deviation std_t * sqrt(sigma - sigma_next); ours is compared against theirs times "
    "sqrt(sigma - sigma_next) (the raw difference is recorded too).",
    "dtypes: none needed; both cast velocity and sample to float32 themselves.",
]


# -- locating and importing flow_grpo ----------------------------------------------------------------------------------
def commit_of(root: Path) -> str | None:
    marker = root / "COMMIT"
    if marker.exists():
        return marker.read_text().strip()
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except OSError:
        return None


def load_flow_grpo(root: Path):
    """Import flow_grpo's step function and stat tracker from ``root``; raises with a reason when it cannot."""
    if not (root / "flow_grpo" / "diffusers_patch" / "sd3_sde_with_logprob.py").exists():
        raise FileNotFoundError(f"flow_grpo's source is not at {root} (expected "
                                f"{root}/flow_grpo/diffusers_patch/sd3_sde_with_logprob.py); get it from {UPSTREAM}")
    sys.path.insert(0, str(root))
    step_mod = importlib.import_module(STEP_MODULE)
    tracker_mod = importlib.import_module(TRACKER_MODULE)
    loaded = Path(step_mod.__file__).resolve()
    if root.resolve() not in loaded.parents:
        raise ImportError(f"{STEP_MODULE} was imported from {loaded}, not from {root}")
    return step_mod.sde_step_with_logprob, tracker_mod.PerPromptStatTracker


def make_scheduler(sigmas: torch.Tensor):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(sigmas=sigmas[:-1].tolist())
    return sched


# -- calling both ----------------------------------------------------------------------------------------------------
def call_ours(x, v, sigmas, steps, prev=None, generator=None):
    s = sigmas[steps]
    s_next = sigmas[steps + 1]
    return sde_step_with_logprob(x, v, s, s_next, noise_level=NOISE_LEVEL, prev_sample=prev, generator=generator)


def call_theirs(fn, sched, x, v, steps, prev=None, generator=None):
    """flow_grpo's step through the shims: timesteps from the scheduler, video latents as a 4-D view."""
    shape = x.shape
    four = (shape[0], -1, *shape[-2:])
    out = fn(sched, v.reshape(four), sched.timesteps[steps], x.reshape(four), noise_level=NOISE_LEVEL,
             prev_sample=None if prev is None else prev.reshape(four), generator=generator)
    prev_sample, log_prob, mean, std_dev_t = out
    return prev_sample.reshape(shape), log_prob, mean.reshape(shape), std_dev_t


def ref_log_prob64(prev, mean, std) -> tuple[torch.Tensor, float]:
    """The Gaussian log-density averaged over non-batch elements, in float64 from the given float32 operands, and the
    float32 rounding scale of that average: machine epsilon times the largest per-sample mean of |element
    log-density| (the elements are O(1) while their mean can be near 0, so |log_prob| itself is no scale)."""
    p, m = prev.double(), mean.double()
    s = std.double().expand_as(m)
    lp = -((p - m) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    scale = torch.finfo(torch.float32).eps * float(lp.abs().flatten(1).mean(1).max())
    return lp.flatten(1).mean(1), scale


def maxdiff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def compare(fn, sched, x, v, sigmas, steps, prev=None, seed=None) -> dict:
    """One case: both steps on identical inputs; differences after the std convention is aligned."""
    g1 = g2 = None
    if seed is not None:
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    o_prev, o_lp, o_mean, o_std = call_ours(x, v, sigmas, steps, prev, g1)
    t_prev, t_lp, t_mean, t_std_dev_t = call_theirs(fn, sched, x, v, steps, prev, g2)
    dt = (sigmas[steps] - sigmas[steps + 1]).view(-1, *([1] * (x.ndim - 1)))
    t_std_step = t_std_dev_t.reshape(-1, *([1] * (x.ndim - 1))) * torch.sqrt(dt)
    o_std_b = torch.as_tensor(o_std).expand(x.shape[0], *([1] * (x.ndim - 1)))
    used_prev = o_prev.float() if prev is None else prev.float()
    ref, scale = ref_log_prob64(used_prev, o_mean, o_std_b)
    row = {
        "steps": steps.tolist(),
        "sigma": [round(float(s), 6) for s in sigmas[steps]],
        "sigma_next": [round(float(s), 6) for s in sigmas[steps + 1]],
        "max_abs_diff": {
            "mean": maxdiff(o_mean, t_mean),
            "std (ours vs theirs * sqrt(sigma - sigma_next))": maxdiff(o_std_b, t_std_step),
            "std raw (ours vs their std_dev_t)": maxdiff(o_std_b, t_std_dev_t.reshape_as(o_std_b)),
            "log_prob": maxdiff(o_lp, t_lp),
        },
        "log_prob_range": [float(o_lp.min()), float(o_lp.max())],
        "log_prob_err_vs_float64": {"ours": maxdiff(o_lp, ref), "theirs": maxdiff(t_lp, ref)},
        "float32_eps_x_mean_abs_element": scale,
        "dtypes": {"ours prev_sample": str(o_prev.dtype).replace("torch.", ""),
                   "theirs prev_sample": str(t_prev.dtype).replace("torch.", "")},
    }
    if prev is None:
        row["max_abs_diff"]["prev_sample (same seed)"] = maxdiff(o_prev, t_prev)
    return row


def five_d_probe(fn, sched, sigmas) -> dict:
    """What a direct 5-D call (no view shim) does: flow_grpo's sigma view is [B, 1, 1, 1]."""
    out = {}
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 16, 4, 8, 8, generator=g)
    v, p = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    try:
        fn(sched, v, sched.timesteps[torch.tensor([0, 3, 6, 9])], x, noise_level=NOISE_LEVEL, prev_sample=p)
        out["[4, 16, 4, 8, 8]"] = "ran"
    except Exception as err:  # noqa: BLE001 - the error itself is the finding
        out["[4, 16, 4, 8, 8]"] = f"{type(err).__name__}: {err}"
    x = torch.randn(4, 4, 4, 8, 8, generator=g)  # B == C: broadcasts without error
    v, p = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    for label, steps in (("same step for all samples", torch.tensor([3, 3, 3, 3])),
                         ("per-sample steps [0, 3, 6, 9]", torch.tensor([0, 3, 6, 9]))):
        _, lp, mean, _ = fn(sched, v, sched.timesteps[steps], x, noise_level=NOISE_LEVEL, prev_sample=p)
        _, o_lp, o_mean, _ = call_ours(x, v, sigmas, steps, p)
        out[f"[4, 4, 4, 8, 8] (B == C), {label}"] = {"mean": maxdiff(mean, o_mean), "log_prob": maxdiff(lp, o_lp)}
    return out


def bf16_check(fn, sched, sigmas, shape, step: int, seed: int) -> dict:
    """bf16 latents and velocity, sampling path: what each returns, and whether re-scoring the returned sample gives
    back the returned log-prob (what a GRPO update does with a stored rollout)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).bfloat16()
    v = torch.randn(shape, generator=g).bfloat16()
    steps = torch.full((shape[0],), step)
    o_prev, o_lp, _, _ = call_ours(x, v, sigmas, steps, generator=torch.Generator().manual_seed(seed + 1))
    t_prev, t_lp, _, _ = call_theirs(fn, sched, x, v, steps, generator=torch.Generator().manual_seed(seed + 1))
    _, o_re, _, _ = call_ours(x, v, sigmas, steps, prev=o_prev)
    _, t_re, _, _ = call_theirs(fn, sched, x, v, steps, prev=t_prev)
    return {
        "step": step, "sigma": float(sigmas[step]),
        "dtypes": {"ours prev_sample": str(o_prev.dtype).replace("torch.", ""),
                   "theirs prev_sample": str(t_prev.dtype).replace("torch.", "")},
        "max_abs_diff": {"prev_sample": maxdiff(o_prev, t_prev), "log_prob (as returned)": maxdiff(o_lp, t_lp)},
        "rescore_minus_returned_log_prob": {"ours": maxdiff(o_re, o_lp), "theirs": maxdiff(t_re, t_lp)},
    }


def time_calls(fn, sched, shape, sigmas, repeats: int, seed: int) -> dict:
    """Median seconds per call on the scoring path (``prev_sample`` given, as in the update), over every step, the
    two interleaved so machine noise hits both alike. Ours gets sigma as ``Tensor[B]`` as our GRPO passes it."""
    g = torch.Generator().manual_seed(seed)
    x, v, p = (torch.randn(shape, generator=g) for _ in range(3))
    n = len(sigmas) - 1
    ours, theirs = [], []
    for rep in range(repeats + 2):  # two warm-up rounds, not kept
        for i in range(n):
            steps = torch.full((shape[0],), i)
            pair = [("ours", lambda: call_ours(x, v, sigmas, steps, p)),
                    ("theirs", lambda: call_theirs(fn, sched, x, v, steps, p))]
            for name, call in (pair if (rep + i) % 2 == 0 else pair[::-1]):
                start = time.perf_counter()
                call()
                elapsed = time.perf_counter() - start
                if rep >= 2:
                    (ours if name == "ours" else theirs).append(elapsed)
    o, t = statistics.median(ours), statistics.median(theirs)
    ratios = [b / a for a, b in zip(ours, theirs)]
    return {"shape": list(shape), "calls_each": len(ours), "ours_us": o * 1e6, "theirs_us": t * 1e6,
            "theirs_over_ours": statistics.median(ratios),
            "ours_us_p10_p90": [np.percentile(ours, 10) * 1e6, np.percentile(ours, 90) * 1e6],
            "theirs_us_p10_p90": [np.percentile(theirs, 10) * 1e6, np.percentile(theirs, 90) * 1e6]}


def lookup_us(sched, batch: int, repeats: int) -> float:
    """Median microseconds of the scheduler look-ups flow_grpo's step makes per call: diffusers'
    ``index_for_timestep`` once per sample (an exact-equality ``nonzero`` over the timesteps), for a mid step."""
    t = sched.timesteps[torch.full((batch,), len(sched.timesteps) // 2)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        [sched.index_for_timestep(x) for x in t]
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def advantages_check(tracker_cls, groups: int, k: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    rewards = torch.rand(groups * k, generator=g)
    rewards[-k:] = 0.5  # one group of equal rewards: the eps keeps it at 0
    prompts = [f"prompt {i // k}" for i in range(groups * k)]
    ours = group_advantages(rewards, k)
    out = {"groups": groups, "group_size": k, "rows": {}}

    def theirs(global_std: bool, order=None):
        idx = np.arange(len(prompts)) if order is None else order
        tracker = tracker_cls(global_std=global_std)  # fresh, as flow_grpo clears it after every epoch
        adv = tracker.update([prompts[i] for i in idx], rewards.double().numpy()[idx])
        back = np.empty_like(adv)
        back[idx] = adv
        return torch.from_numpy(back)

    perm = np.random.default_rng(seed).permutation(len(prompts))
    out["rows"]["global_std=False (per-group std)"] = maxdiff(ours, theirs(False))
    out["rows"]["global_std=False, rollouts shuffled (groups found by prompt)"] = maxdiff(ours, theirs(False, perm))
    out["rows"]["global_std=True (flow_grpo's config default: one std over the whole batch)"] = \
        maxdiff(ours, theirs(True))
    r64 = rewards.double().view(groups, k)
    ours64 = ((r64 - r64.mean(1, keepdim=True)) / (r64.std(1, unbiased=False, keepdim=True) + 1e-4)).flatten()
    out["ours_float32_vs_float64_same_formula"] = maxdiff(ours, ours64)
    out["max_abs_advantage"] = float(ours.abs().max())
    return out


# -- report ----------------------------------------------------------------------------------------------------------
def fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.2e}"


def markdown(result: dict) -> str:
    lines = ["# flow_grpo side by side: SDE step with log-probability and group advantages", ""]
    fg = result["flow_grpo"]
    lines += [f"flow_grpo ({UPSTREAM}) at commit `{fg.get('commit')}`, imported at run time from `{fg['root']}`. "
              f"Machine: {result['machine']}.", ""]
    if "error" in result:
        lines += [f"**{result['error']}**", "", f"Command: `{result['command']}`", ""]
        return "\n".join(lines)
    cfg = result["config"]
    lines += [f"Inputs: latents {cfg['shape']} (video [B, C, T, H, W]), velocities and prev_sample drawn N(0, 1) "
              f"(seed {cfg['seed']}), sigmas `sampling_sigmas(10, shift=3)` = {cfg['sigmas']}, noise_level "
              f"{NOISE_LEVEL}, float32. `prev_sample` is either a rollout sample (drawn by our step with a seed, then "
              "given to both) or an independent N(0, 1) tensor (far from the mean: large log-prob magnitudes).", "",
              "## SDE step: max abs difference, ours vs flow_grpo", "",
              "| case | steps | mean | std (aligned) | std raw | log_prob | log_prob range | ours vs float64 | "
              "theirs vs float64 | prev_sample |", "|---|---|---|---|---|---|---|---|---|---|"]
    for case, row in result["step"].items():
        d = row["max_abs_diff"]
        lines.append(f"| {case} | {row['steps'] if len(set(row['steps'])) > 1 else row['steps'][0]} | "
                     f"{fmt(d['mean'])} | {fmt(d['std (ours vs theirs * sqrt(sigma - sigma_next))'])} | "
                     f"{fmt(d['std raw (ours vs their std_dev_t)'])} | {fmt(d['log_prob'])} | "
                     f"{row['log_prob_range'][0]:.4g} .. {row['log_prob_range'][1]:.4g} | "
                     f"{fmt(row['log_prob_err_vs_float64']['ours'])} | "
                     f"{fmt(row['log_prob_err_vs_float64']['theirs'])} | "
                     f"{fmt(d['prev_sample (same seed)']) if 'prev_sample (same seed)' in d else '-'} |")
    s = result["summary"]
    lines += ["", f"Over every case: max |mean diff| {fmt(s['mean'])}, max |std diff| (aligned) {fmt(s['std'])}, "
              f"max |log_prob diff| {fmt(s['log_prob'])}; sampling with the same seed: max |prev_sample diff| "
              f"{fmt(s['prev_sample'])}. 'vs float64' is each side's error against the Gaussian log-density averaged "
              "in float64 from the same float32 mean, std and sample; at most "
              f"{s['log_prob_err_in_eps_units']:.2f} x float32 epsilon x the mean |element log-density| of its "
              "row.", "",
              "## Every difference explained", ""] + [f"- {e}" for e in result["explanations"]] + [""]
    b = result["bf16"]
    lines += ["## bf16 latents and velocity (sampling path, same seed)", "",
              f"Step {b['step']} (sigma {b['sigma']:.4f}): ours returns prev_sample as "
              f"{b['dtypes']['ours prev_sample']}, "
              f"flow_grpo as {b['dtypes']['theirs prev_sample']}; max |prev_sample diff| "
              f"{fmt(b['max_abs_diff']['prev_sample'])}, returned log_prob diff "
              f"{fmt(b['max_abs_diff']['log_prob (as returned)'])}. Re-scoring the returned sample (what an update "
              f"does with a stored rollout) minus the returned log-prob: ours "
              f"{fmt(b['rescore_minus_returned_log_prob']['ours'])}, flow_grpo "
              f"{fmt(b['rescore_minus_returned_log_prob']['theirs'])}. " + b["note"], ""]
    lines += ["## A direct 5-D call (without the view shim)", ""]
    for k, val in result["five_d_direct"].items():
        lines.append(f"- {k}: " + (val if isinstance(val, str) else
                                   f"max |mean diff| {fmt(val['mean'])}, max |log_prob diff| {fmt(val['log_prob'])}"))
    lines += ["", "flow_grpo's sigma is `view(-1, 1, 1, 1)`: on 5-D latents it fails unless B == C (or B == 1); with "
              "B == C it silently gives sample i's sigma to channel i, which only matters when the samples are at "
              "different steps. flow_grpo itself only calls it on 4-D SD3 latents with one timestep for the whole "
              "batch, where this never arises; the harness uses the exact 4-D view (shim 2).", ""]
    lines += ["## Time per call on CPU (scoring path, every step, interleaved)", "",
              f"{result['config']['threads']} torch thread(s); median over all calls (p10-p90).", "",
              "| latents | calls each | ours (us) | flow_grpo (us) | flow_grpo / ours (median of pairs) |",
              "|---|---|---|---|---|"]
    for t in result["timing"]:
        lines.append(f"| {t['shape']} | {t['calls_each']} | {t['ours_us']:.0f} ({t['ours_us_p10_p90'][0]:.0f}-"
                     f"{t['ours_us_p10_p90'][1]:.0f}) | {t['theirs_us']:.0f} ({t['theirs_us_p10_p90'][0]:.0f}-"
                     f"{t['theirs_us_p10_p90'][1]:.0f}) | {t['theirs_over_ours']:.2f}x |")
    lines += ["", result["timing_note"], ""]
    a = result["advantages"]
    lines += ["## Group advantages: `group_advantages` vs `PerPromptStatTracker.update`", "",
              f"{a['groups']} groups of {a['group_size']} random rewards (the last group all equal), max |adv| "
              f"{a['max_abs_advantage']:.3f}.", "", "| flow_grpo setting | max abs diff |", "|---|---|"]
    for k, val in a["rows"].items():
        lines.append(f"| {k} | {fmt(val)} |")
    lines += ["", "Ours in float32 against the same formula in float64: "
              f"{fmt(a['ours_float32_vs_float64_same_formula'])}"
              " (flow_grpo's tracker works in float64, so the global_std=False differences are our float32 rounding)."
              " " + a["note"], "", "## Clipped GRPO loss", "", result["loss"], "",
              "## Shims (all in this harness; flow_grpo's files are untouched)", ""]
    lines += [f"- {x}" for x in result["shims"]]
    lines += ["", "Source (how it was obtained):", ""] + [f"- {c}" for c in result["setup"]]
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


EXPLANATIONS = [
    "mean: the same formula in the same float32 operation order on both sides (flow_grpo's `sigma_max = "
    "sigmas[1]` for the first step equals our `sigma_next` there, since only step 0 has sigma = 1), so any "
    "difference above 0 would be a real discrepancy.",
    "std: flow_grpo returns std_dev_t = a * sqrt(sigma / (1 - sigma)) (per unit time; its KL term divides by it), "
    "ours returns the step's standard deviation std_t * sqrt(sigma - sigma_next): a naming/convention difference "
    "(the 'std raw' column); aligned, they agree.",
    "log_prob: both average the element log-densities over every non-batch dimension (no sum, no reduction "
    "difference); flow_grpo's image code averages over [C, H, W], on our [C*T, H, W] view that is every element. "
    "The constant is written differently (flow_grpo: log(sqrt(2 pi)) computed in float32 tensors; ours: the double "
    "0.5 * log(2 pi) added to a float32 tensor) but both round to the same float32 value 0.91893852, and every other "
    "operation is the same in the same order, so the two log-probs are bitwise equal; their shared error against "
    "the float64 reference (columns 'vs float64', identical on both sides) is float32 rounding: within a few "
    "float32 epsilons times the mean |element log-density| (summary: 'log_prob_err_in_eps_units'); the elements are "
    "O(1) while their mean can be near 0, which is why a row's error can look large against its |log_prob|.",
    "sigma indexing: flow_grpo takes a timestep (1000 x sigma) and looks up its index i in the scheduler, then uses "
    "sigmas[i] and sigmas[i + 1] (its 'sigma_prev' is our sigma_next): the same pair as ours once the scheduler "
    "holds our grid (shim 1); per-sample different steps (the mixed row) index per sample on both sides.",
    "prev_sample when sampling: both draw standard normals of the sample's shape from the given generator "
    "(flow_grpo through diffusers' randn_tensor, on the 4-D view of the same number of elements in the same order), "
    "so the same seed gives the same sample.",
    "dtype of the returned sample: flow_grpo returns it in float32 whatever the input dtype, ours casts it back to "
    "the input dtype (see the bf16 section; a real behavioural difference of the function, which our GRPO module "
    "never meets because its rollouts start from float32 noise, so its latents stay float32).",
    "validation: ours raises unless 0 <= sigma_next < sigma <= 1; flow_grpo checks nothing (a timestep not on the "
    "scheduler's grid fails in its index lookup).",
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flow_grpo_root", default=None,
                        help="flow_grpo's source tree (default $VIDEOALIGN_PEERS_ROOT/src/flow_grpo)")
    parser.add_argument("--repeats", type=int, default=100, help="timing rounds (each times every step once)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="few timing rounds, small latents only")
    parser.add_argument("--output", default=str(RESULTS / "peers_flow_grpo"), help="path stem of the .json and .md")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.flow_grpo_root) if args.flow_grpo_root else PEERS_ROOT / "src" / "flow_grpo"
    result = {
        "command": " ".join([*([f"VIDEOALIGN_PEERS_ROOT={shlex.quote(os.environ['VIDEOALIGN_PEERS_ROOT'])}"]
                               if "VIDEOALIGN_PEERS_ROOT" in os.environ else []),
                              "python -m benchmarks.peers_flow_grpo", *map(shlex.quote, argv)]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch "
                   f"thread(s), torch {torch.__version__}, Python {platform.python_version()}",
        "flow_grpo": {"upstream": UPSTREAM, "root": str(root), "commit": commit_of(root) if root.exists() else None,
                      "imported": [f"{STEP_MODULE}.sde_step_with_logprob", f"{TRACKER_MODULE}.PerPromptStatTracker"]},
        "shims": SHIMS,
        "setup": [c.format(root=root) for c in SETUP],
    }
    try:
        step_fn, tracker_cls = load_flow_grpo(root)
        import diffusers

        result["flow_grpo"]["diffusers"] = diffusers.__version__
    except Exception as err:  # noqa: BLE001 - recorded, not raised: the peer is optional
        result["error"] = f"could not run: {type(err).__name__}: {err}"
        return write_result(result, args.output, markdown)

    shape = (4, 16, 4, 8, 8)
    sigmas = sampling_sigmas(10, shift=3)
    sched = make_scheduler(sigmas)
    result["config"] = {"shape": list(shape), "seed": args.seed, "threads": args.threads, "noise_level": NOISE_LEVEL,
                        "sigmas": [round(float(s), 4) for s in sigmas],
                        "scheduler_sigmas_max_abs_diff": maxdiff(sched.sigmas, sigmas)}
    g = torch.Generator().manual_seed(args.seed)
    x, v, noise_prev = (torch.randn(shape, generator=g) for _ in range(3))
    b = shape[0]
    step_rows = {}
    for i in range(len(sigmas) - 1):
        steps = torch.full((b,), i)
        rollout_prev, _, _, _ = call_ours(x, v, sigmas, steps, generator=torch.Generator().manual_seed(100 + i))
        step_rows[f"step {i}, rollout prev_sample"] = compare(step_fn, sched, x, v, sigmas, steps, rollout_prev)
        step_rows[f"step {i}, random prev_sample"] = compare(step_fn, sched, x, v, sigmas, steps, noise_prev)
        step_rows[f"step {i}, sampling (same seed)"] = compare(step_fn, sched, x, v, sigmas, steps, seed=200 + i)
    mixed = torch.tensor([0, 3, 6, 9])
    step_rows["per-sample steps, random prev_sample"] = compare(step_fn, sched, x, v, sigmas, mixed, noise_prev)
    step_rows["per-sample steps, sampling (same seed)"] = compare(step_fn, sched, x, v, sigmas, mixed, seed=300)
    result["step"] = step_rows
    rows = list(step_rows.values())
    result["summary"] = {
        "mean": max(r["max_abs_diff"]["mean"] for r in rows),
        "std": max(r["max_abs_diff"]["std (ours vs theirs * sqrt(sigma - sigma_next))"] for r in rows),
        "log_prob": max(r["max_abs_diff"]["log_prob"] for r in rows),
        "prev_sample": max(r["max_abs_diff"].get("prev_sample (same seed)", 0.0) for r in rows),
        "log_prob_err_in_eps_units": max(max(r["log_prob_err_vs_float64"].values()) /
                                         r["float32_eps_x_mean_abs_element"] for r in rows),
        "log_prob_err_vs_float64": {"ours": max(r["log_prob_err_vs_float64"]["ours"] for r in rows),
                                    "theirs": max(r["log_prob_err_vs_float64"]["theirs"] for r in rows)},
    }
    result["explanations"] = EXPLANATIONS
    result["bf16"] = bf16_check(step_fn, sched, sigmas, shape, step=3, seed=args.seed + 400)
    result["bf16"]["note"] = (
        "Both compute the sample and its log-prob in float32; flow_grpo returns that float32 sample (and its pipeline "
        "stores it before casting the running latents back), ours returns it rounded to bf16, so the stored sample "
        "is not exactly the one whose log-prob was returned and an on-policy ratio is exp(difference) rather than 1 "
        "(compare clip_range 1e-4). Our GRPO module is not affected: its rollout latents start as float32 noise and "
        "stay float32 (the velocity's dtype does not matter, both cast it to float32).")
    result["five_d_direct"] = five_d_probe(step_fn, sched, sigmas)

    shapes = [shape] if args.quick else [shape, (4, 16, 8, 32, 32)]
    result["timing"] = []
    for sh in shapes:
        reps = 3 if args.quick else (args.repeats if sh == shape else max(1, args.repeats // 10))
        result["timing"].append(time_calls(step_fn, sched, sh, sigmas, reps, args.seed + 500))
    result["scheduler_lookup_us"] = lookup_us(sched, shape[0], 50 if args.quick else 2000)
    result["timing_note"] = (
        "Both do the same float32 tensor maths; per call flow_grpo also looks up each sample's step index in the "
        "scheduler (one `nonzero` per sample), reads `sigmas[1]` with `.item()`, and computes sqrt(-dt) and the "
        "2 pi constant as tensors; ours validates the sigmas (`any()` on two comparisons) and broadcasts Tensor[B] "
        "sigmas. On small latents these fixed per-call costs dominate; on large ones the elementwise maths does. "
        f"Measured here: the {shape[0]} `index_for_timestep` calls alone take {result['scheduler_lookup_us']:.0f} us "
        f"per call, of a {result['timing'][0]['theirs_us'] - result['timing'][0]['ours_us']:.0f} us gap on the "
        f"{result['timing'][0]['shape']} latents; the rest is its other extra small tensor operations per call "
        "(sigma gathers and views, `torch.where`, sqrt(-dt) twice, the constant as three tensor operations) against "
        "our validation, each a few microseconds on tensors this small.")
    adv = advantages_check(tracker_cls, groups=4, k=8, seed=args.seed + 600)
    adv["note"] = ("Groups: ours takes contiguous blocks of group_size, flow_grpo groups by the prompt string "
                   "(np.unique), so both agree when rollouts are laid out group by group and flow_grpo also handles "
                   "any order. With global_std=True (flow_grpo's default in config/base.py and config/grpo.py) it "
                   "divides by one std over the whole batch instead of each group's: a different estimator, not a "
                   "discrepancy; ours has only the per-group std (and, as an option of the GRPO module, a running "
                   "per-prompt history, where flow_grpo clears its tracker every epoch).")
    result["advantages"] = adv
    result["loss"] = (
        "Not compared: flow_grpo's advantage clipping, clipped ratio loss and KL term are inline in `main()` of "
        "`scripts/train_sd3.py` (lines 881-897 at this commit), not an importable function, and re-implementing them "
        "here would compare us with ourselves. Read, not run: its policy loss is the same PPO surrogate as our "
        "`grpo_policy_loss` (`mean(max(-A * r, -A * clip(r, 1 - c, 1 + c)))`, advantages clamped to "
        "`adv_clip_max` first); its KL term divides the mean squared difference of the means by 2 * std_dev_t**2 "
        "(the per-unit-time coefficient it returns), while our `gaussian_kl` is given the step's std, so ours is "
        "flow_grpo's divided by (sigma - sigma_next), the exact KL between the two Gaussian steps: the same "
        "`kl_beta` weighs the KL differently per step in the two codes.")
    return write_result(result, args.output, markdown)


if __name__ == "__main__":
    main()
