"""reward_zoo.hpsv2: the published OpenCLIP checkpoint is read safely, converted to a transformers CLIPModel whose
embeddings equal OpenCLIP's forward (a hand-written reference, and open_clip itself where it is installed), scored
as HPSv2 scores (normalised cosine, no scale, long side resized and padded), differentiable, and refused clearly
when the file holds anything but fitting tensors. Everything runs on tiny random configs: no real weights here."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from test_hub import hub  # noqa: F401  (the local Hub server fixture)

from reward_zoo import create_reward, reward_info
from reward_zoo.clip_preprocess import CLIP_MEAN, CLIP_STD, padded_pixel_values
from reward_zoo.hpsv2 import (
    HPSv2,
    clip_config_from_openclip,
    convert_hpsv2,
    convert_openclip_state_dict,
    read_openclip_checkpoint,
)

# A tiny OpenCLIP ViT CLIP: vision width 32 (2 heads of 16), patch 8 on 32 px; text width 24 (2 heads), 16 tokens.
VISION, TEXT, EMBED, PATCH, IMAGE, CONTEXT, LAYERS = 32, 24, 16, 8, 32, 16, 2
WORDS = ("a", "ball", "red", "blue", "falls", "moves", "left", "and", "bounces")


def clip_tokenizer(path, vocab_size: int):
    """A word-level tokenizer laid out like CLIP's: start/end-of-text are the last two ids, padding is end-of-text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    vocab.update({f"<filler{i}>": i for i in range(len(vocab), vocab_size - 2)})
    vocab.update({"<|startoftext|>": vocab_size - 2, "<|endoftext|>": vocab_size - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab_size - 2), ("<|endoftext|>", vocab_size - 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", unk_token="<unk>", model_max_length=CONTEXT)
    tokenizer.save_pretrained(path)
    return tokenizer


def openclip_state_dict(seed: int = 0, vocab_size: int = 32, vision: int = VISION, text: int = TEXT
                        ) -> dict[str, torch.Tensor]:
    """Random tensors in OpenCLIP's ViT CLIP layout (``visual.*``, ``transformer.*``, ``text_projection``...) with
    tower widths ``vision`` and ``text``."""
    VISION, TEXT = vision, text  # noqa: N806  (the module constants, overridden)
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    state = {"visual.conv1.weight": randn(VISION, 3, PATCH, PATCH), "visual.class_embedding": randn(VISION),
             "visual.positional_embedding": randn((IMAGE // PATCH) ** 2 + 1, VISION),
             "visual.proj": randn(VISION, EMBED), "token_embedding.weight": randn(vocab_size, TEXT),
             "positional_embedding": randn(CONTEXT, TEXT), "text_projection": randn(TEXT, EMBED),
             "logit_scale": torch.tensor(math.log(1 / 0.07))}
    for name, width in (("visual.ln_pre", VISION), ("visual.ln_post", VISION), ("ln_final", TEXT)):
        state[f"{name}.weight"], state[f"{name}.bias"] = 1 + randn(width), randn(width)
    for prefix, width in (("visual.", VISION), ("", TEXT)):
        for i in range(LAYERS):
            p = f"{prefix}transformer.resblocks.{i}."
            for ln in ("ln_1", "ln_2"):
                state[p + f"{ln}.weight"], state[p + f"{ln}.bias"] = 1 + randn(width), randn(width)
            state[p + "attn.in_proj_weight"], state[p + "attn.in_proj_bias"] = randn(3 * width, width), randn(3 * width)
            state[p + "attn.out_proj.weight"], state[p + "attn.out_proj.bias"] = randn(width, width), randn(width)
            state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"] = randn(4 * width, width), randn(4 * width)
            state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"] = randn(width, 4 * width), randn(width)
    return state


# -- a hand-written OpenCLIP forward (pre-LN residual blocks with packed in_proj attention) -------------------------
def _block(x, s, p, heads, causal):
    n, length, w = x.shape
    h = F.layer_norm(x, (w,), s[p + "ln_1.weight"], s[p + "ln_1.bias"])
    q, k, v = (h @ s[p + "attn.in_proj_weight"].T + s[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
    q, k, v = (t.view(n, length, heads, w // heads).transpose(1, 2) for t in (q, k, v))  # (n, heads, l, hd)
    att = q @ k.transpose(-1, -2) / math.sqrt(w // heads)  # (n, heads, l, l)
    if causal:
        att = att.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    o = (att.softmax(-1) @ v).transpose(1, 2).reshape(n, length, w)
    x = x + o @ s[p + "attn.out_proj.weight"].T + s[p + "attn.out_proj.bias"]
    h = F.layer_norm(x, (w,), s[p + "ln_2.weight"], s[p + "ln_2.bias"])
    h = F.gelu(h @ s[p + "mlp.c_fc.weight"].T + s[p + "mlp.c_fc.bias"])
    return x + h @ s[p + "mlp.c_proj.weight"].T + s[p + "mlp.c_proj.bias"]


def openclip_image(s, pixels, heads=2):
    x = F.conv2d(pixels, s["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)  # (n, g*g, w)
    cls = s["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + s["visual.positional_embedding"]  # class token first
    x = F.layer_norm(x, x.shape[-1:], s["visual.ln_pre.weight"], s["visual.ln_pre.bias"])
    for i in range(LAYERS):
        x = _block(x, s, f"visual.transformer.resblocks.{i}.", heads, causal=False)
    pooled = F.layer_norm(x[:, 0], x.shape[-1:], s["visual.ln_post.weight"], s["visual.ln_post.bias"])
    return pooled @ s["visual.proj"]  # (n, d)


def openclip_text(s, ids, heads=2):
    x = s["token_embedding.weight"][ids] + s["positional_embedding"][: ids.shape[1]]
    for i in range(LAYERS):
        x = _block(x, s, f"transformer.resblocks.{i}.", heads, causal=True)
    x = F.layer_norm(x, x.shape[-1:], s["ln_final.weight"], s["ln_final.bias"])
    return x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ s["text_projection"]  # pooled at end-of-text


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny HPSv2-style checkpoint (``{"state_dict": ...}`` in a ``.pt``) and a CLIP-layout tokenizer folder."""
    root = tmp_path_factory.mktemp("hps")
    state = openclip_state_dict()
    torch.save({"state_dict": state}, root / "HPS_tiny.pt")
    clip_tokenizer(root / "tokenizer", vocab_size=32)
    return root, state


def build(root, **kwargs) -> HPSv2:
    return HPSv2.from_openclip_checkpoint(root / "HPS_tiny.pt", vision_head_width=16, text_heads=2,
                                          tokenizer_name_or_path=str(root / "tokenizer"), **kwargs)


def test_is_registered_with_its_card_facts():
    info = reward_info("hpsv2")
    assert info["family"] == "hpsv2" and info["dimensions"] == ["preference"] and info["differentiable"]
    assert info["license"] == "apache-2.0" and info["paper_url"].endswith("2306.09341")


def test_config_is_read_from_the_shapes(checkpoint):
    _, state = checkpoint
    config = clip_config_from_openclip(state, vision_head_width=16, text_heads=2)
    assert config["vision_config"] == {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                                       "hidden_act": "gelu"}
    assert config["text_config"]["num_hidden_layers"] == 2 and config["text_config"]["eos_token_id"] == 31
    assert config["projection_dim"] == EMBED and config["text_config"]["max_position_embeddings"] == CONTEXT


def test_converted_embeddings_equal_the_openclip_forward(checkpoint):
    root, state = checkpoint
    reward = build(root)
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    tokens = reward.tokenizer(["a red ball falls", "a blue ball moves left and bounces"], padding=True,
                              return_tensors="pt")
    with torch.no_grad():
        image = reward.image_encoder.visual_projection(
            reward.image_encoder.vision_model(pixel_values=pixels).pooler_output)
        text = reward.text_encoder(tokens["input_ids"], tokens["attention_mask"])
        ref_image, ref_text = openclip_image(state, pixels), openclip_text(state, tokens["input_ids"])
    # Same maths in another order: measured max |diff| 4.8e-7 (image, embeddings up to 2.2) and 5.1e-7 (text, up
    # to 1.3) over 3 pixel seeds (torch 2.14.1, CPU float32); 1e-5 leaves 20x headroom for other kernels.
    torch.testing.assert_close(image, ref_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text, ref_text, atol=1e-5, rtol=1e-5)


def test_score_is_the_normalised_cosine_of_padded_frames(checkpoint):
    root, state = checkpoint
    reward = build(root, num_frames=2)
    videos = torch.rand(2, 4, 3, 24, 40, generator=torch.Generator().manual_seed(2))  # wide: padded top and bottom
    prompts = ["a red ball falls", "a blue ball bounces"]
    with torch.no_grad():
        scores = reward(videos, prompts)
        frames = videos[:, [0, 3]].flatten(0, 1)  # 2 frames: first and last
        pixels = padded_pixel_values(frames, IMAGE, torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD))
        image = F.normalize(openclip_image(state, pixels), dim=-1).view(2, 2, -1)
        ids = reward.tokenizer(prompts, padding=True, return_tensors="pt")["input_ids"]
        text = F.normalize(openclip_text(state, ids), dim=-1)
    expected = (image * text[:, None]).sum(-1).mean(1)  # HPSv2: diagonal of image @ text.T, no logit scale
    # cosines in [-1, 1]; measured max |diff| 8.9e-8 over 3 seeds (torch 2.14.1, CPU float32)
    torch.testing.assert_close(scores["preference"], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(scores["overall"], scores["preference"])
    assert ((scores["overall"] >= -1) & (scores["overall"] <= 1)).all()


def test_ranking_follows_the_reference_ranking(checkpoint):
    """On random weights a "matching" frame is only what the reference model says matches: the reward must rank
    frames as the OpenCLIP forward does (parity of the ranking, not semantics)."""
    root, state = checkpoint
    reward = build(root, num_frames=1)
    frames = torch.rand(6, 1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    prompt = ["a red ball falls"] * 6
    with torch.no_grad():
        ours = reward(frames, prompt)["overall"]
        pixels = padded_pixel_values(frames[:, 0], IMAGE, torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD))
        ids = reward.tokenizer(prompt[:1], return_tensors="pt")["input_ids"]
        ref = F.normalize(openclip_image(state, pixels), dim=-1) @ F.normalize(openclip_text(state, ids), dim=-1).T
    assert torch.equal(ours.argsort(), ref[:, 0].argsort())
    best, worst = ref[:, 0].argmax(), ref[:, 0].argmin()
    assert ours[best] > ours[worst]


def test_gradients_reach_the_pixels(checkpoint):
    root, _ = checkpoint
    reward = build(root, num_frames=2)
    videos = torch.rand(2, 3, 3, 20, 28, requires_grad=True)
    reward(videos, ["a red ball falls", "a blue ball bounces"])["overall"].sum().backward()
    assert videos.grad is not None and torch.isfinite(videos.grad).all()
    assert videos.grad[:, [0, 2]].abs().sum() > 0 and videos.grad[:, 1].abs().sum() == 0  # only sampled frames


def test_convert_round_trips_through_the_hub_layout(checkpoint, tmp_path):
    root, _ = checkpoint
    out = convert_hpsv2(root / "HPS_tiny.pt", tmp_path / "hps", vision_head_width=16, text_heads=2,
                        tokenizer_name_or_path=str(root / "tokenizer"), num_frames=3)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card and "reward_class: reward_zoo.hpsv2.HPSv2" in card and "Parity" in card
    loaded = create_reward(str(out))
    direct = build(root, num_frames=3)
    videos, prompts = torch.rand(2, 5, 3, 32, 32), ["a red ball falls", "a blue ball bounces"]
    with torch.no_grad():
        assert torch.equal(loaded(videos, prompts)["overall"], direct(videos, prompts)["overall"])


class NotATensor:
    pass


@pytest.mark.parametrize("payload, message", [
    ({"state_dict": {"visual.conv1.weight": "weights"}}, "holds non-tensor entries"),
    ([torch.zeros(2)], "holds a list"),
    (NotATensor(), "torch.load\\(weights_only=True\\) can read"),
])
def test_bad_checkpoints_are_refused_and_nothing_is_written(checkpoint, tmp_path, payload, message):
    root, _ = checkpoint
    src = tmp_path / "bad.pth"
    with open(src, "wb") as f:
        (torch.save(payload, f) if not isinstance(payload, NotATensor) else pickle.dump(payload, f, protocol=2))
    with pytest.raises(ValueError, match=message) as err:
        convert_hpsv2(src, tmp_path / "out", tokenizer_name_or_path=str(root / "tokenizer"))
    assert str(src) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["bad.pth"]


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("visual.ln_post.bias"), "missing key 'image_encoder.vision_model.post_layernorm.bias'"),
    (lambda s: s.update({"visual.extra": torch.zeros(1)}), "unexpected key 'visual.extra'"),
    (lambda s: s.update({"ln_final.weight": torch.ones(TEXT + 1)}),
     "has shape \\(25,\\) in the checkpoint but \\(24,\\)"),
])
def test_state_dicts_that_do_not_fit_are_refused(checkpoint, tmp_path, edit, message):
    root, state = checkpoint
    bad = dict(state)
    edit(bad)
    src = tmp_path / "misfit.pt"
    torch.save(bad, src)  # a bare state dict is accepted as well as {"state_dict": ...}
    with pytest.raises(ValueError, match=message) as err:
        convert_hpsv2(src, tmp_path / "out", vision_head_width=16, text_heads=2,
                      tokenizer_name_or_path=str(root / "tokenizer"))
    assert str(src) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_read_strips_module_prefix_and_ignores_the_causal_mask(checkpoint, tmp_path):
    _, state = checkpoint
    src = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in {**state, "attn_mask": torch.zeros(2, 2)}.items()}}, src)
    assert read_openclip_checkpoint(src).keys() == state.keys()
    converted = convert_openclip_state_dict(state)
    assert converted["visual_projection.weight"].shape == (EMBED, VISION)  # transposed
    assert torch.equal(converted["vision_model.encoder.layers.0.self_attn.k_proj.weight"],
                       state["visual.transformer.resblocks.0.attn.in_proj_weight"][VISION:2 * VISION])


def test_a_tokenizer_ending_prompts_elsewhere_is_refused(checkpoint, tmp_path):
    root, state = checkpoint
    from lit_videoalign.testing import write_tiny_clip

    write_tiny_clip(tmp_path / "word")  # its tokenizer ends prompts with </s> = id 1
    config = clip_config_from_openclip(state, vision_head_width=16, text_heads=2)
    with pytest.raises(ValueError, match="pools at id 31"):
        HPSv2(clip_config=config, tokenizer_name_or_path=str(tmp_path / "word"))


def test_parity_with_open_clip_itself(checkpoint, tmp_path):
    """Where ``open_clip`` is importable, its own model with these weights gives the same embeddings."""
    open_clip = pytest.importorskip("open_clip")
    root, state = checkpoint
    model = open_clip.model.CLIP(
        embed_dim=EMBED, vision_cfg={"layers": LAYERS, "width": VISION, "head_width": 16, "patch_size": PATCH,
                                     "image_size": IMAGE},
        text_cfg={"context_length": CONTEXT, "vocab_size": 32, "width": TEXT, "heads": 2, "layers": LAYERS})
    model.load_state_dict(state, strict=True)
    model.eval()
    reward = build(root)
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    ids = reward.tokenizer(["a red ball falls", "a ball"], padding="max_length", max_length=CONTEXT,
                           return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours_image = reward.image_encoder.visual_projection(
            reward.image_encoder.vision_model(pixel_values=pixels).pooler_output)
        ours_text = reward.text_encoder(ids)
        # measured max |diff| 4.8e-7 (image) and 1.2e-7 (text) with open_clip_torch 3.3.0, torch 2.14.1, CPU float32
        torch.testing.assert_close(ours_image, model.encode_image(pixels), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_text, model.encode_text(ids), atol=1e-5, rtol=1e-5)


def test_reward_zoo_convert_command(checkpoint, tmp_path, capsys):
    """``reward-zoo convert hpsv2 SRC DST`` with ViT-H-14's head widths (80 per vision head, 16 text heads) on a tiny
    checkpoint of those widths: the written folder scores like the reward built in memory."""
    from lit_videoalign.errors import UsageError
    from reward_zoo.cli import main

    root, _ = checkpoint
    state = openclip_state_dict(seed=4, vision=160, text=32)  # 2 vision heads of 80, 16 text heads of 2
    torch.save({"state_dict": state}, tmp_path / "HPS_v2.1_tiny.pt")
    main(["convert", "hpsv2", str(tmp_path / "HPS_v2.1_tiny.pt"), str(tmp_path / "out"),
          "--tokenizer", str(root / "tokenizer"), "--num_frames", "2"])
    assert f"wrote {tmp_path / 'out'}" in capsys.readouterr().out
    loaded = create_reward(str(tmp_path / "out"))
    assert loaded.num_frames == 2 and loaded.image_encoder.vision_model.config.num_attention_heads == 2
    direct = HPSv2.from_openclip_checkpoint(tmp_path / "HPS_v2.1_tiny.pt", num_frames=2,
                                            tokenizer_name_or_path=str(root / "tokenizer"))
    videos, prompts = torch.rand(1, 3, 3, 32, 48), ["a ball falls"]
    with torch.no_grad():
        assert torch.equal(loaded(videos, prompts)["overall"], direct(videos, prompts)["overall"])
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        main(["convert", "hpsv2", str(tmp_path / "HPS_v2.1_tiny.pt"), str(tmp_path / "out"),
              "--tokenizer", str(root / "tokenizer")])
    with pytest.raises(UsageError, match="unknown checkpoint family 'hps'"):
        main(["convert", "hps", str(tmp_path / "HPS_v2.1_tiny.pt"), str(tmp_path / "out2")])


@pytest.mark.parametrize("config", ["configs/toyworld/grpo.yaml", "configs/toyworld/reward_gradient.yaml"])
def test_grpo_and_reward_gradient_run_two_steps_through_the_cli(checkpoint, config, tmp_path, capsys):
    """The toy world's GRPO and reward-gradient recipes with a converted tiny ``hpsv2`` as their reward."""
    import json

    from test_cli import tiny_overrides

    from lit_videoalign.cli import main

    root, _ = checkpoint
    convert_hpsv2(root / "HPS_tiny.pt", tmp_path / "hps", vision_head_width=16, text_heads=2,
                  tokenizer_name_or_path=str(root / "tokenizer"), num_frames=2)
    spec = {"class_path": "reward_zoo.create_reward", "init_args": {"name_or_hub_id": str(tmp_path / "hps")}}
    main(["fit", "--config", config, *tiny_overrides(config, tmp_path, "", tmp_path, ""),
          f"--model.init_args.reward={json.dumps(spec)}"])
    out = capsys.readouterr().out
    assert "2 steps" in out and (tmp_path / "pipeline" / "model_index.json").is_file()


def test_converted_folder_round_trips_through_a_local_hub(checkpoint, tmp_path, hub):  # noqa: F811
    """``reward-zoo convert``'s folder, committed to the local Hub server, loads with ``create_reward("hf-hub:...")``
    and scores as the folder does."""
    root, _ = checkpoint
    out = convert_hpsv2(root / "HPS_tiny.pt", tmp_path / "hps", vision_head_width=16, text_heads=2,
                        tokenizer_name_or_path=str(root / "tokenizer"), num_frames=2)
    hub.commit("org/hpsv2", out, "converted HPSv2")
    remote, local = create_reward("hf-hub:org/hpsv2"), create_reward(str(out))
    videos, prompts = torch.rand(2, 4, 3, 32, 40), ["a red ball falls", "a blue ball bounces"]
    with torch.no_grad():
        assert torch.equal(remote(videos, prompts)["overall"], local(videos, prompts)["overall"])
