"""Real-size smoke benchmark of the real-model rewards: each built at its real architecture with random weights,
scoring one 2-second 480p video on CPU.

    python -m benchmarks.reward_real_size [--rewards videoreward hpsv2 pickscore] [--threads 2] [--repeats 1]
        [--warmup 0] [--merge RESULT.json]

Per reward, in its own subprocess (so peak RSS is its own): build time, seconds to score one video (the mean of
``--repeats`` calls after ``--warmup`` calls, under ``torch.no_grad``), peak RSS, and the vision tokens the video
becomes.
The video is ``[1, 32, 3, 480, 832]`` at 16 fps (Wan's 480p), float32 in [0, 1].

No weights or tokenizers download here, so each reward gets an offline stand-in tokenizer with the real special-token
ids (the text length the real tokenizer gives is estimated, not measured): for ``videoreward`` a byte-level BPE
trained on this repository's Markdown (8192 tokens) padded so Qwen2-VL's special tokens keep their ids 151643-151656;
for ``hpsv2`` and ``pickscore`` a word-level tokenizer with CLIP's 49408 ids and start/end ids 49406/49407.
``pickscore`` loads from a CLIP folder, so a random-weight ``CLIPModel`` at ViT-H-14's geometry is saved (safetensors)
with that tokenizer and a default ``CLIPImageProcessor`` into a temporary folder and loaded from there.
``videoreward``'s prompt template is a stand-in written here with the length of VideoAlign's (which this repository
does not ship). Timings are of random weights in float32 and scale with the machine; they are a smoke test of the real
shapes, not a speed claim. Results go to ``benchmarks/results/reward_real_size.{json,md}``; ``--merge`` keeps the
other rewards' rows of an earlier result (each row records the command that measured it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import add_output_argument, output_path, write_result

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
REWARDS = ("videoreward", "hpsv2", "pickscore")
FRAMES, HEIGHT, WIDTH, FPS = 32, 480, 832, 16.0
PROMPT = "A golden retriever runs across a sunlit meadow, the camera tracking it from the side."
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")  # ids 151643-151656 in Qwen2-VL
QWEN_FIRST_SPECIAL = 151643
TEMPLATE_CHARS = 3997  # characters of VideoAlign's detailed_special template at the pinned revision


def stand_in_template(chars: int = TEMPLATE_CHARS) -> str:
    """A videoreward prompt template written for this benchmark (not VideoAlign's text, which is not shipped): the
    three reward tokens and ``{text_prompt}``, padded with a neutral sentence to ``chars`` characters, so the
    sequence has about the real length."""
    tail = ("How do the frames look? <|VQ_reward|>\nHow does it move? <|MQ_reward|>\n"
            "Request: {text_prompt}\nHow closely does it follow the request? <|TA_reward|>\n")
    filler = "Score the clip on its own merits, frame by frame and across time. "
    head = (filler * (chars // len(filler) + 1))[:chars - len(tail)]
    return head + tail


def qwen_stand_in_processor(path: Path) -> Path:
    """A ``Qwen2VLProcessor`` whose tokenizer is a byte-level BPE trained on the repository's Markdown, padded so the
    Qwen2-VL special tokens have their real ids (the model's embedding rows and ``video_token_id`` line up)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from lit_videoalign.testing import TINY_QWEN2VL_CHAT_TEMPLATE

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = [p.read_text(errors="ignore") for p in sorted(ROOT.glob("**/*.md")) if ".venv" not in p.parts]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8192, initial_alphabet=pre_tokenizers.ByteLevel
                                                       .alphabet(), show_progress=False))
    spec = json.loads(bpe.to_str())["model"]
    vocab = dict(spec["vocab"])
    for i in range(len(vocab), QWEN_FIRST_SPECIAL):
        vocab[f"<|unused_{i}|>"] = i  # never produced: no merge builds them
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL)})
    assert tokenizer.convert_tokens_to_ids("<|video_pad|>") == 151656, "stand-in ids must match Qwen2-VL's"
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                     video_processor=Qwen2VLVideoProcessor(),
                     chat_template=TINY_QWEN2VL_CHAT_TEMPLATE).save_pretrained(path)
    return path


def clip_stand_in_tokenizer(path: Path) -> Path:
    """A word-level tokenizer with CLIP's 49408 ids, start ``<|startoftext|>`` = 49406 and end = 49407."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = PROMPT.lower().replace(",", "").replace(".", "").split()
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(words))}}
    for i in range(len(vocab), 49406):
        vocab[f"<unused_{i}>"] = i
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 49406, 49407
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                       special_tokens=[("<|startoftext|>", 49406),
                                                                       ("<|endoftext|>", 49407)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>", unk_token="<unk>", model_max_length=77).save_pretrained(path)
    return path


def build(name: str, tmp: Path):
    """The reward at its real architecture, random weights; and a function giving its vision tokens per video."""
    if name == "videoreward":
        from reward_zoo.videoreward import MAX_FRAME_PIXELS, VideoReward, sample_frame_indices, smart_resize

        reward = VideoReward(processor_name_or_path=str(qwen_stand_in_processor(tmp / "qwen")), normalize=False,
                             prompt_template=stand_in_template())
        h, w = smart_resize(HEIGHT, WIDTH, max_pixels=MAX_FRAME_PIXELS)
        k = len(sample_frame_indices(FRAMES, FPS, reward.fps))
        grid = [k // 2, h // 14, w // 14]
        text = reward.tokenizer(reward.texts([PROMPT], reward.num_video_tokens(grid)))["input_ids"][0]
        return reward, {"frames_sampled": k, "frame_size": [h, w], "vision_tokens": reward.num_video_tokens(grid),
                        "sequence_tokens": len(text),
                        "prompt_template": f"stand-in, {TEMPLATE_CHARS} characters (VideoAlign's is not shipped)"}
    if name == "hpsv2":
        from reward_zoo.hpsv2 import HPSv2

        reward = HPSv2(tokenizer_name_or_path=str(clip_stand_in_tokenizer(tmp / "clip")))
        vision = reward.image_encoder.vision_model.config
        per_frame = (vision.image_size // vision.patch_size) ** 2 + 1  # patches + class token
        return reward, {"frames_sampled": reward.num_frames, "frame_size": [vision.image_size] * 2,
                        "vision_tokens": per_frame * reward.num_frames, "sequence_tokens": 77}
    if name == "pickscore":
        return pickscore_reward(tmp)
    raise ValueError(f"unknown reward {name!r}; known: {REWARDS}")


def pickscore_folder(path: Path) -> Path:
    """A CLIP folder shaped like ``yuvalkirstain/PickScore_v1`` with CLIP-H's processor: a random-weight ViT-H-14
    ``CLIPModel`` (safetensors), the stand-in CLIP tokenizer and ``CLIPImageProcessor``'s defaults (shortest side 224,
    centre crop 224, OpenAI CLIP mean/std, as CLIP-H's processor has)."""
    import gc

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from reward_zoo.hpsv2 import vit_h_14_config

    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(**vit_h_14_config()))
    clip.save_pretrained(path, safe_serialization=True)
    del clip
    gc.collect()  # free the built copy before the reward loads its own (peak RSS then holds one model)
    clip_stand_in_tokenizer(path)
    CLIPImageProcessor().save_pretrained(path)
    return path


def pickscore_reward(tmp: Path):
    """``pickscore`` loaded from :func:`pickscore_folder` (model and processor from the one folder)."""
    from reward_zoo.pickscore import PickScore

    folder = str(pickscore_folder(tmp / "pickscore"))
    reward = PickScore(model_name_or_path=folder, processor_name_or_path=folder)
    vision = reward.image_encoder.vision_model.config
    per_frame = (vision.image_size // vision.patch_size) ** 2 + 1  # patches + class token
    return reward, {"frames_sampled": reward.num_frames, "frame_size": [vision.image_size] * 2,
                    "vision_tokens": per_frame * reward.num_frames, "sequence_tokens": 77,
                    "tokenizer": "stand-in (word-level, CLIP's 49408 ids; the real CLIP-H tokenizer is not available "
                                 "offline)"}


def worker(name: str, repeats: int, warmup: int) -> dict:
    import torch

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        reward, shapes = build(name, Path(tmp))
        build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in reward.parameters())
    video = torch.rand(1, FRAMES, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            scores = reward(video, [PROMPT], fps=FPS)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"reward": name, "params": params, "build_s": build_s, "seconds_per_video": sum(times) / len(times),
            "calls": len(times), "peak_rss_mib": peak, "rss_after_imports_mib": base,
            "overall": float(scores["overall"][0]), **shapes}


def markdown(result: dict) -> str:
    rows = ["| reward | parameters | frames sampled | frame size | vision tokens | sequence tokens | build (s) | "
            "seconds / video | peak RSS (GiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if "error" in r:
            rows.append(f"| `{r['reward']}` | failed: {r['error']} | | | | | | | |")
            continue
        rows.append(f"| `{r['reward']}` | {r['params'] / 1e9:.2f} B | {r['frames_sampled']} | "
                    f"{r['frame_size'][0]}x{r['frame_size'][1]} | {r['vision_tokens']} | {r['sequence_tokens']} | "
                    f"{r['build_s']:.0f} | {r['seconds_per_video']:.1f} | {r['peak_rss_mib'] / 1024:.1f} |")
    env = result["environment"]
    commands = {}  # command -> the rewards it measured (rows of a --merge carry their own)
    for r in result["runs"]:
        commands.setdefault(r.get("command", result["command"]), []).append(f"`{r['reward']}`")
    header = [f"`{result['command']}`"] if len(commands) == 1 else [
        "; ".join(f"{', '.join(names)}: `{cmd}`" for cmd, names in commands.items())]
    return "\n".join([
        "# Real-size rewards on CPU: one 2-second 480p video", "",
        *header, "",
        f"A `[1, {FRAMES}, 3, {HEIGHT}, {WIDTH}]` video at {FPS:g} fps, float32, random weights at the real "
        f"architecture, {env['threads']} CPU thread(s) ({env['machine']}, torch {env['torch']}). Seconds per video: "
        f"the mean of {result['repeats']} call(s) after {result['warmup']} warm-up call(s); peak RSS of the reward's "
        "own process.", "",
        *rows, "",
        "Vision tokens: what the language model (videoreward: merged 2x2 Qwen2-VL patches over 2-frame temporal "
        "patches) or the image tower (hpsv2, pickscore: patches + class token per frame) reads. Sequence tokens: "
        "videoreward's whole prompt with an offline stand-in tokenizer (a byte-level BPE trained on this "
        "repository's Markdown; Qwen2-VL's own tokenizer was not available offline, so the text part of the count is "
        f"an estimate) and a stand-in prompt template of VideoAlign's length ({TEMPLATE_CHARS} characters; its text "
        "is not shipped here); the CLIP rewards' text context is 77, with a stand-in word-level tokenizer of CLIP's "
        "49408 ids (the real CLIP-H tokenizer was not available offline). `pickscore` is the same CLIP ViT-H-14 as "
        "`hpsv2` (centre crop instead of padding); it loads from a CLIP folder, so its random-weight `CLIPModel` is "
        "first saved to a temporary folder (its build time includes saving and reloading about 4 GB).", ""])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=REWARDS)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--merge", default=None, metavar="RESULT.json",
                        help="keep the rows of this earlier result for rewards not run now")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    add_output_argument(parser, RESULTS / "reward_real_size")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats, args.warmup)))
        return {}
    import torch

    command = "python -m benchmarks.reward_real_size " + " ".join(argv if argv is not None else sys.argv[1:])
    earlier = read_merge(args.merge, args) if args.merge else None
    runs = []
    for name in args.rewards:  # one at a time: each in its own process
        cmd = [sys.executable, "-m", "benchmarks.reward_real_size", "--worker", name, "--repeats", str(args.repeats),
               "--warmup", str(args.warmup)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if res.returncode != 0:
            runs.append({"reward": name, "error": (res.stderr.strip().splitlines() or ["?"])[-1][:200]})
        else:
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        runs[-1]["command"] = command.strip()
        print(json.dumps(runs[-1]))
    if earlier is not None:
        kept = [{"command": earlier["command"], **r} for r in earlier["runs"] if r["reward"] not in args.rewards]
        runs = sorted(kept + runs, key=lambda r: REWARDS.index(r["reward"]) if r["reward"] in REWARDS else len(REWARDS))
    result = {"command": command.strip(), "repeats": args.repeats, "warmup": args.warmup, "runs": runs,
              "environment": {"threads": args.threads, "machine": platform.machine(), "torch": torch.__version__}}
    return write_result(result, output_path(args), markdown)


def read_merge(path: str, args: argparse.Namespace) -> dict:
    """The earlier result to merge into, checked to be measured the same way (threads, repeats, warm-up)."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"--merge {path!r}: cannot read an earlier reward_real_size result ({err})") from None
    env = earlier.get("environment", {})
    for key, now, then in (("threads", args.threads, env.get("threads")), ("repeats", args.repeats,
                           earlier.get("repeats")), ("warmup", args.warmup, earlier.get("warmup"))):
        if now != then:
            raise SystemExit(f"--merge {path!r}: it was measured with --{key} {then}, this run uses {now}; "
                             "expected the same settings")
    return earlier


if __name__ == "__main__":
    main()
