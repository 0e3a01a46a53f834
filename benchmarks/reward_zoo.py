"""Reward-zoo validation: does each reward rank clean toy-world videos above the corruptions it targets?

    python -m benchmarks.reward_zoo [--seeds 200] [--no_ties] [--update_cards]

Three measurements, all on held-out toy-world seeds (the test seed range, in a block no test, tuning run or model card
uses), written to ``benchmarks/results/reward_zoo.{json,md}``:

1. **Verifiable rewards** (``newton`` and each of its dimensions, ``flicker``, ``subject_consistency``,
   ``dynamic_degree``): for every corruption, the fraction of seeds where the clean video scores strictly above its
   corrupted copy (a score tie counts as a miss). The corruptions a reward *targets* are fixed below in
   :data:`VERIFIABLE_TARGETS` from what each reward measures; only they are held to the issue's 95% bar, the others
   are shown in parentheses for information (e.g. consistency rewards prefer a frozen copy, as documented).
2. **Learned shipped rewards** (``physics_learned``, ``identity``, ``quality``): the same clean-vs-corrupted pairwise
   accuracy per corruption, for every reward dimension whose training label the corruption damages
   (``lit_videoalign.data.toyworld_pairs.labels_for``); corrupted videos are made by the training data's own
   ``apply_corruption``. Then, unless ``--no_ties``, the model-card protocol of ``reward_zoo.training``: each
   reward's ``configs/rewards/<name>.yaml`` data module, tie thresholds calibrated on its validation pairs, accuracy
   with and without ties on its test pairs (seed ranges disjoint from training).
3. **Default composite**: a frozen-frame copy must not beat the original (scored as a batch of two, as objectives do).

Seeds are chosen by the ground truth only (e.g. "the first ball bounces", "at least two frames follow the bounce"),
never by a reward's score. ``--update_cards`` writes each learned reward's rows into its model card.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from torch import Tensor

from lit_videoalign.data.toyworld import (
    PHYSICS_CORRUPTIONS,
    PROMPT_CORRUPTIONS,
    TEST_SEED_OFFSET,
    VAL_SEED_OFFSET,
    VISUAL_CORRUPTIONS,
    ToyWorld,
    simulate,
)
from lit_videoalign.data.toyworld_pairs import (
    IDENTITY_CORRUPTIONS,
    ToyWorldPairsDataModule,
    apply_corruption,
    labels_for,
)
from reward_zoo import create_reward
from reward_zoo.composite import default_toyworld_composite
from reward_zoo.registry import PRETRAINED_DIR
from reward_zoo.training import RewardTraining, pairwise_accuracy

SEED_OFFSET = TEST_SEED_OFFSET + 60_000_000  # held out: training, validation, model-card and test seeds lie elsewhere
BAR = 0.95
ROOT = Path(__file__).resolve().parent.parent
TR_ALL, TR_VISIBLE = "time_reversal", "time_reversal_visible"  # all bounce scenes / >= 2 frames after the bounce
FROZEN = "frozen"
CASES = (*[c for c in PHYSICS_CORRUPTIONS if c != TR_ALL], TR_ALL, TR_VISIBLE, *VISUAL_CORRUPTIONS,
         *PROMPT_CORRUPTIONS, *IDENTITY_CORRUPTIONS, FROZEN)
CASE_TITLES = {TR_ALL: "time_reversal (all bounces)¹", TR_VISIBLE: "time_reversal (≥2 frames after bounce)¹",
               FROZEN: "frozen copy"}

# What each verifiable reward (reward/dimension) measures, hence which corruptions it must catch.
VERIFIABLE_TARGETS: dict[str, tuple[str, ...]] = {
    "newton/overall": ("gravity_wrong", "gravity_zero", "teleport", "size_change", TR_ALL, TR_VISIBLE, FROZEN),
    "newton/acceleration": ("gravity_wrong", "gravity_zero", FROZEN),  # the fitted acceleration is not gravity
    "newton/continuity": ("teleport",),  # one frame far off the constant-acceleration fit
    "newton/mass": ("size_change",),  # the apparent area changes
    "newton/energy": (TR_ALL, TR_VISIBLE),  # a reversed bounce gains energy
    "flicker/overall": ("flicker",),  # alternating brightness is a large second temporal difference
    "subject_consistency/overall": ("noise",),  # independent per-frame noise decorrelates frames
    "dynamic_degree/overall": (FROZEN,),  # a frozen video does not move
}
VERIFIABLE_CASES = (*[c for c in CASES if c in (*PHYSICS_CORRUPTIONS, TR_VISIBLE)], *VISUAL_CORRUPTIONS, FROZEN)
# Learned rewards: reward dimension -> the training label it was fitted to (as in configs/rewards/*.yaml).
LEARNED = {"physics_learned": {"physics": "physics"}, "identity": {"mean": "identity", "worst": "identity"},
           "quality": {"visual": "visual", "motion": "motion", "text": "text"}}


def frames_after_first_bounce(world: ToyWorld, seed: int) -> int:
    """Frames of ``world.example(seed, require_bounce=True)`` after the first ball's first floor contact."""
    scene = world.example(seed, require_bounce=True).scene
    for f in range(scene.num_frames):
        if bool(simulate(replace(scene, num_frames=f + 1)).bounced[0]):  # the contact lies inside [f, f + 1]
            return scene.num_frames - 1 - f
    raise AssertionError("require_bounce guarantees a bounce")


def build_cases(world: ToyWorld, n: int) -> dict[str, dict]:
    """Per case: ``{"clean", "bad": Tensor[n, T, C, H, W], "prompts": list[str], "seeds": list[int]}``.

    The corrupted copy of seed ``s`` uses ``torch.Generator().manual_seed(s)``; prompt corruptions keep the clean
    prompt and change the video (as the training pairs do). ``time_reversal_visible`` takes the first ``n`` seeds
    from ``SEED_OFFSET`` on with at least two frames after the first bounce.
    """
    plain = list(range(SEED_OFFSET, SEED_OFFSET + n))
    visible, seed = [], SEED_OFFSET
    while len(visible) < n:
        if frames_after_first_bounce(world, seed) >= 2:
            visible.append(seed)
        seed += 1
    cases = {}
    for case in CASES:
        seeds = visible if case == TR_VISIBLE else plain
        kind = TR_ALL if case == TR_VISIBLE else case
        clean, bad, prompts = [], [], []
        for s in seeds:
            example = world.example(s, require_bounce=kind == TR_ALL)
            clean.append(example.video)
            prompts.append(example.prompt)
            if case == FROZEN:
                bad.append(example.video[:1].expand_as(example.video).clone())
            else:
                bad.append(apply_corruption(world, example, kind, torch.Generator().manual_seed(s)).video)
        cases[case] = {"clean": torch.stack(clean), "bad": torch.stack(bad), "prompts": prompts, "seeds": seeds}
    return cases


@torch.no_grad()
def score(reward, videos: Tensor, prompts: list[str], chunk: int = 50) -> dict[str, Tensor]:
    """Scores of ``videos`` in chunks: ``{dimension: Tensor[n]}``."""
    parts = [reward(videos[i:i + chunk], prompts[i:i + chunk] if reward.requires_prompts else None)
             for i in range(0, len(videos), chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def win_rates(reward, cases: dict[str, dict], names: list[str]) -> dict[str, dict[str, dict]]:
    """``{dimension: {case: {"acc", "n"}}}``: how often the clean video scores strictly above the damaged one."""
    out: dict[str, dict[str, dict]] = {}
    clean_cache: dict[tuple, dict[str, Tensor]] = {}
    for case in names:
        c = cases[case]
        key = (tuple(c["seeds"]), case == TR_ALL or case == TR_VISIBLE)
        if key not in clean_cache:
            clean_cache[key] = score(reward, c["clean"], c["prompts"])
        r_clean, r_bad = clean_cache[key], score(reward, c["bad"], c["prompts"])
        for dim in r_clean:
            ones = torch.ones(len(c["seeds"]), dtype=torch.long)  # every pair: the clean video is better
            out.setdefault(dim, {})[case] = {"acc": pairwise_accuracy(r_clean[dim], r_bad[dim], ones),
                                             "n": len(c["seeds"])}
    return out


def verifiable_table(cases: dict[str, dict]) -> dict[str, dict]:
    rows = {}
    for name in ("newton", "flicker", "subject_consistency", "dynamic_degree"):
        rates = win_rates(create_reward(name), cases, list(VERIFIABLE_CASES))
        dims = ["overall", *[d for d in rates if d != "overall"]] if len(rates) > 2 else ["overall"]
        for dim in dims:
            targets = VERIFIABLE_TARGETS[f"{name}/{dim}"]
            rows[f"{name}/{dim}"] = {case: {**v, "targeted": case in targets} for case, v in rates[dim].items()}
    return rows


def learned_table(cases: dict[str, dict]) -> dict[str, dict]:
    """Clean-vs-corrupted accuracy of each learned dimension on the corruptions that damage its training label."""
    rows = {}
    for name, dims in LEARNED.items():
        reward = create_reward(name, pretrained=True)
        targeted = {dim: [c for c in CASES if c != FROZEN
                          and labels_for(None, TR_ALL if c == TR_VISIBLE else c)[label] == 1]
                    for dim, label in dims.items()}
        needed = sorted({c for cs in targeted.values() for c in cs}, key=CASES.index)
        rates = win_rates(reward, cases, needed)
        for dim, cs in targeted.items():
            rows[f"{name}/{dim}"] = {c: {**rates[dim][c], "targeted": True} for c in cs}
    return rows


def tie_protocol(name: str) -> dict:
    """The model-card evaluation of a shipped reward: tie thresholds from validation pairs, test-split accuracies."""
    config = yaml.safe_load((ROOT / "configs" / "rewards" / f"{name}.yaml").read_text())
    model_args = config["model"]["init_args"]
    data = ToyWorldPairsDataModule(**config["data"]["init_args"])
    module = RewardTraining(create_reward(name, pretrained=True), loss=model_args.get("loss", "bt_ties"),
                            tie_k=model_args.get("tie_k", 5.0), dimensions=model_args.get("dimensions"),
                            score_scale=model_args.get("score_scale", 1.0))
    val = module.evaluate(data.val_dataloader(), "val")
    test = module.evaluate(data.test_dataloader(), "test")
    return {"val": val, "test": test, "val_pairs": data.sizes["val"], "test_pairs": data.sizes["test"],
            "val_seed": data.seed + VAL_SEED_OFFSET, "test_seed": data.seed + TEST_SEED_OFFSET}


@torch.no_grad()
def frozen_composite(n: int) -> dict:
    """How often the default composite scores the original above its frozen-frame copy (a batch of the two)."""
    reward, world, wins = default_toyworld_composite(), ToyWorld(), 0
    for seed in range(SEED_OFFSET, SEED_OFFSET + n):
        example = world.example(seed)
        frozen = example.video[:1].expand_as(example.video)
        scores = reward(torch.stack([example.video, frozen]), [example.prompt] * 2)["overall"]
        wins += bool(scores[0] > scores[1])
    return {"acc": wins / n, "n": n}


# -- markdown ---------------------------------------------------------------------------------------------------
def _cell(entry: dict | None) -> str:
    if entry is None:
        return "—"
    value = f"{entry['acc']:.3f}"
    if not entry["targeted"]:
        return f"({value})"
    return f"**{value} ✗**" if entry["acc"] < BAR else value


def rate_table(rows: dict[str, dict], columns: list[str]) -> list[str]:
    header = ["reward / dimension", *[CASE_TITLES.get(c, c) for c in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, cells in rows.items():
        lines.append(f"| `{row}` | " + " | ".join(_cell(cells.get(c)) for c in columns) + " |")
    return lines


def tie_lines(name: str, result: dict) -> list[str]:
    lines = ["| dimension | acc (no ties) | acc w/ ties | tie threshold | strict / tied pairs | "
             "by corruption (no ties) |", "|---|---|---|---|---|---|"]
    for dim, e in result["test"]["dimensions"].items():
        by = ", ".join(f"{k} {v['acc']:.3f}" + (" ✗" if v["acc"] < BAR else "") for k, v in e["by_corruption"].items())
        acc = f"**{e['acc']:.3f} ✗**" if e["acc"] < BAR else f"{e['acc']:.3f}"
        lines.append(f"| `{name}/{dim}` | {acc} | {e['acc_ties']:.3f} | {e['tie_threshold']:.4g} | "
                     f"{e['strict_pairs']} / {e['tied_pairs']} | {by} |")
    return lines


FOOTNOTES = [
    "¹ A time-reversed free flight is valid physics: a parabola played backwards is a parabola with the same gravity. "
    "Reversal only breaks physics through a bounce, which loses energy forwards and so *gains* it backwards; that is "
    "visible only if the clip shows the ball after its first floor contact. *All bounces* uses every scene whose first "
    "ball bounces (some bounce in the last frame, where the reversed clip is indistinguishable from valid physics); "
    "*≥2 frames after bounce* keeps the scenes, chosen by the ground-truth trajectory, with at least two frames after "
    "the contact. The second column is the one a reward can be held to.",
]


def markdown(result: dict) -> str:
    n = result["seeds"]
    verifiable_cols = list(VERIFIABLE_CASES)
    learned_cols = [c for c in CASES if any(c in cells for cells in result["learned"].values())]
    lines = [
        "# Reward zoo validation (toy world)", "",
        f"Written by `python -m benchmarks.reward_zoo --seeds {n}` ({result['seconds'] / 60:.1f} min, "
        f"{result['threads']} torch thread). Held-out toy-world seeds from {SEED_OFFSET} (the test range, "
        f"`TEST_SEED_OFFSET + 60_000_000`), {n} per corruption; chosen by the ground truth only. "
        f"A cell is the fraction of seeds where the clean video scores strictly above its corrupted copy "
        f"(ties count as misses). **✗ marks a targeted cell below the {BAR:.0%} bar.** Cells in parentheses are "
        f"corruptions the reward does not target (shown for information, not held to the bar).", "",
        "## Verifiable rewards", "",
        *rate_table(result["verifiable"], verifiable_cols), "",
        "Targets: `newton` all physics corruptions and frozen copies (a frozen ball does not fall); its dimensions "
        "the violation each measures (acceleration: wrong or missing gravity; continuity: teleports; mass: size "
        "changes; energy: time-reversed bounces); `flicker` flicker; `subject_consistency` per-frame noise; "
        "`dynamic_degree` frozen copies. `flicker` and `subject_consistency` prefer frozen videos by design (pair them "
        "with `dynamic_degree`). `clip_score` and `laion_aesthetic` are left out: they need downloaded weights and "
        "target real footage, not toy-world corruptions.", "",
        "## Learned rewards: clean vs each corruption", "",
        "Pairwise accuracy, clean above corrupted, for each reward dimension on the corruptions that damage the label "
        "it was trained on (`lit_videoalign.data.toyworld_pairs.labels_for`; prompt corruptions: the video shows "
        "another colour or direction than the shared prompt; `colour_change`: the first ball changes colour "
        "mid-clip). These seeds were never used for training, validation or the model cards.", "",
        *rate_table(result["learned"], learned_cols), "",
    ]
    if result.get("ties"):
        lines += ["## Learned rewards: model-card protocol (with and without ties)", "",
                  "Each reward's `configs/rewards/<name>.yaml` pairs (clean vs corrupted, mixed corruptions and ties, "
                  "random order): tie thresholds calibrated on the validation split, figures on the test split "
                  "(seed ranges disjoint from training). *acc*: strict pairs; *acc w/ ties*: three-way accuracy on "
                  "all pairs.", ""]
        for name, res in result["ties"].items():
            lines += [f"**{name}**: {res['test_pairs']} test pairs from seed {res['test_seed']}, "
                      f"{res['val_pairs']} validation pairs from seed {res['val_seed']}.", "",
                      *tie_lines(name, res), ""]
    comp = result["composite"]
    lines += ["## Default composite", "",
              f"`default_toyworld_composite()` (newton + quality + 0.5 dynamic_degree, z-scored) scores the original "
              f"above its frozen-frame copy for {comp['acc']:.3f} of {comp['n']} seeds"
              + (" **✗ below 1.0**" if comp["acc"] < 1 else "") + ".", "", *FOOTNOTES, ""]
    return "\n".join(lines)


CARD_BEGIN, CARD_END = "<!-- reward_zoo benchmark: begin -->", "<!-- reward_zoo benchmark: end -->"


def update_card(name: str, result: dict) -> Path:
    """Write (or replace) the benchmark section of a shipped reward's model card."""
    rows = {k: v for k, v in result["learned"].items() if k.startswith(f"{name}/")}
    cols = [c for c in CASES if any(c in cells for cells in rows.values())]
    section = [CARD_BEGIN, "## Clean vs each corruption (benchmarks/reward_zoo.py)", "",
               f"Pairwise accuracy, clean above corrupted, on {result['seeds']} held-out toy-world seeds per "
               f"corruption (from seed {SEED_OFFSET}, never used for training, validation or the test split above), "
               f"for each dimension on the corruptions that damage its training label. ✗: below {BAR:.0%}. "
               f"Regenerate with `python -m benchmarks.reward_zoo --update_cards`; all rewards in "
               f"`benchmarks/results/reward_zoo.md`.", "", *rate_table(rows, cols)]
    below = [f"`{row}` on {kind} ({cell['acc']:.3f})" for row, cells in rows.items() for kind, cell in cells.items()
             if cell["targeted"] and cell["acc"] < BAR]
    if below:
        section += ["", f"Below the {BAR:.0%} bar: {', '.join(below)}. Do not rely on these scores alone for that "
                    f"kind of damage."]
    if any(c in cols for c in (TR_ALL, TR_VISIBLE)):
        section += ["", FOOTNOTES[0]]
    section += [CARD_END]
    card = PRETRAINED_DIR / name / "README.md"
    text = card.read_text()
    block = "\n".join(section)
    if CARD_BEGIN in text:
        text = re.sub(re.escape(CARD_BEGIN) + ".*?" + re.escape(CARD_END), lambda _: block, text, flags=re.S)
    else:  # before the licence section
        text = text.replace("\n## Licence", f"\n{block}\n\n## Licence", 1)
    card.write_text(text)
    return card


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200, help="held-out seeds per corruption")
    parser.add_argument("--no_ties", action="store_true", help="skip the model-card protocol on the config splits")
    parser.add_argument("--update_cards", action="store_true", help="write the learned rows into the model cards")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "reward_zoo"),
                        help="output path without suffix (.json and .md are written)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be positive, got {args.seeds}")
    torch.set_num_threads(1)
    start = time.perf_counter()
    cases = build_cases(ToyWorld(), args.seeds)
    result = {"seeds": args.seeds, "seed_offset": SEED_OFFSET, "threads": torch.get_num_threads(), "bar": BAR,
              "verifiable": verifiable_table(cases), "learned": learned_table(cases)}
    if not args.no_ties:
        result["ties"] = {name: tie_protocol(name) for name in LEARNED}
    result["composite"] = frozen_composite(args.seeds)
    result["seconds"] = time.perf_counter() - start
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    if args.update_cards:
        for name in LEARNED:
            print(f"updated {update_card(name, result)}")
    return result


if __name__ == "__main__":
    main()
