"""Aesthetic rewards after the LAION-Aesthetics predictor V2 (C. Schuhmann, LAION 2022; laion.ai/blog/laion-aesthetics).

The "improved aesthetic predictor" (github.com/christophschuhmann/improved-aesthetic-predictor) is a small head
trained with an MSE loss to regress human aesthetic ratings (SAC, LAION-Logos and AVA, on a 1-10 scale) from
L2-normalised CLIP ViT-L/14 image embeddings. It filtered LAION-5B into LAION-Aesthetics and is the usual "aesthetic
quality" metric for generated images and videos. ``laion_aesthetic`` scores every frame and averages.

The head is this reward's own weights (``model.safetensors``); the CLIP backbone is a frozen pretrained model named
by ``config.json`` and kept out of the state dict (see ``reward_zoo.alignment.exclude_from_state_dict``). The public
predictor's checkpoint (``sac+logos+ava1-l14-linearMSE.pth``, a plain ``state_dict`` of its ``nn.Sequential``) loads
with :meth:`LaionAesthetic.from_laion_state_dict` or :meth:`LaionAesthetic.from_laion_checkpoint`; check the licence
of the predictor's repository before redistributing its weights.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reward_zoo.alignment import CLIPImageEncoder, exclude_from_state_dict, frame_indices, load_clip
from reward_zoo.base import RewardModel
from reward_zoo.registry import register_reward

LAION_AESTHETICS = "https://laion.ai/blog/laion-aesthetics/"
PREDICTOR_REPO = "https://github.com/christophschuhmann/improved-aesthetic-predictor"
LAION_EMBED_DIM = 768  # CLIP ViT-L/14 image embeddings, what the public weights were trained on
# The public head: nn.Sequential(Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64),
# Dropout(0.1), Linear(64, 16), Linear(16, 1)). Its ReLUs are commented out in the original, so the head is affine.
# Dropouts take the odd indices 1, 3, 5 and hold no parameters, so the state dict has the Linear layers at
# 0, 2, 4, 6, 7 under the attribute name "layers".
HIDDEN_SIZES = (1024, 128, 64, 16)
DROPOUTS = (0.2, 0.2, 0.1)
LINEAR_INDICES = (0, 2, 4, 6, 7)


def aesthetic_head(embed_dim: int) -> nn.Sequential:
    """The predictor's head for ``embed_dim``-dimensional embeddings, with the public layout's module indices."""
    sizes = (embed_dim, *HIDDEN_SIZES, 1)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(DROPOUTS):
            layers.append(nn.Dropout(DROPOUTS[i]))
    return nn.Sequential(*layers)


def laion_key_map() -> dict[str, str]:
    """Public predictor key -> this reward's key, e.g. ``"layers.2.weight" -> "head.2.weight"``."""
    return {f"layers.{i}.{p}": f"head.{i}.{p}" for i in LINEAR_INDICES for p in ("weight", "bias")}


@register_reward("laion_aesthetic")
class LaionAesthetic(RewardModel, paper_url=LAION_AESTHETICS, repo_url=PREDICTOR_REPO):
    """LAION aesthetic score: ``mean over frames of head(normalise(CLIP image embedding of the frame))``.

    With the public weights the score is on the ratings' 1-10 scale. The head is affine (no activations), so
    the frame mean equals the head applied to the mean normalised embedding. Frames are preprocessed in torch like
    ``CLIPImageProcessor`` (differentiable). ``create_reward("laion_aesthetic")`` starts from a randomly initialised
    head: load the public weights with :meth:`from_laion_checkpoint` (then ``save_pretrained`` it for the Hub) or
    train the head. The reward starts in eval mode, so the head's dropouts are off until ``.train()``.

    Args:
        clip_model_name_or_path: the CLIP checkpoint (Hub id or folder) whose image embeddings feed the head; the
            public weights need CLIP ViT-L/14 (768-d embeddings).
        clip_revision: Hub revision (branch, tag or commit) of the CLIP checkpoint.
        num_frames: score this many frames, evenly spread over the video (first and last included); None scores
            every frame.
    """

    dimensions = ("aesthetic",)
    differentiable = True
    license = "apache-2.0"
    score_ranges = {"aesthetic": (None, None), "overall": (None, None)}  # an affine head (1-10 with public weights)

    def __init__(self, clip_model_name_or_path: str = "openai/clip-vit-large-patch14",
                 clip_revision: str | None = None, num_frames: int | None = None) -> None:
        super().__init__()
        if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int)
                                       or num_frames < 1):
            raise ValueError(f"num_frames must be a positive integer or None, got {num_frames!r}")
        self.num_frames = num_frames
        self.image_encoder = CLIPImageEncoder(load_clip(clip_model_name_or_path, clip_revision))  # text tower dropped
        self.head = aesthetic_head(self.image_encoder.embed_dim)
        exclude_from_state_dict(self, "image_encoder")
        self.eval()  # a judge scores deterministically; training the head switches its dropouts on with .train()

    def train(self, mode: bool = True) -> LaionAesthetic:
        """The head follows ``mode`` (its dropouts, if it is trained); the frozen CLIP stays in eval mode."""
        super().train(mode)
        self.image_encoder.eval()
        return self

    @classmethod
    def from_laion_state_dict(cls, state_dict: dict[str, Tensor], **init_args) -> LaionAesthetic:
        """Build the reward with the public predictor's head weights.

        Args:
            state_dict: the predictor's state dict, exactly the keys ``layers.{0,2,4,6,7}.{weight,bias}``.
            **init_args: init arguments of the reward (e.g. ``clip_model_name_or_path``).

        Raises:
            ValueError: a key is missing or unexpected, or a tensor's shape differs from the head's (for instance
                weights for 768-d ViT-L/14 embeddings with another CLIP).
        """
        key_map = laion_key_map()
        missing = [k for k in key_map if k not in state_dict]
        unexpected = [k for k in state_dict if k not in key_map]
        if missing or unexpected:
            raise ValueError(f"not an improved-aesthetic-predictor state dict: missing keys {missing}, unexpected "
                             f"keys {unexpected}; expected exactly {sorted(key_map)}")
        reward = cls(**init_args)
        expected = reward.state_dict()
        mapped = {}
        for key, ours in key_map.items():
            tensor = state_dict[key]
            if not isinstance(tensor, Tensor) or tensor.shape != expected[ours].shape:
                shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
                raise ValueError(f"aesthetic predictor key {key!r} has shape {shape}, expected "
                                 f"{tuple(expected[ours].shape)} for CLIP image embeddings of size "
                                 f"{reward.image_encoder.embed_dim} (the public weights need CLIP ViT-L/14, "
                                 f"{LAION_EMBED_DIM}-d)")
            mapped[ours] = tensor.to(expected[ours].dtype)
        reward.load_state_dict(mapped, strict=True)
        return reward.eval()

    @classmethod
    def from_laion_checkpoint(cls, path: str | os.PathLike, **init_args) -> LaionAesthetic:
        """Load the public ``.pth`` file (e.g. ``sac+logos+ava1-l14-linearMSE.pth``) with ``weights_only=True``."""
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state_dict, dict):
            raise ValueError(f"{path} holds a {type(state_dict).__name__}, expected the predictor's state dict")
        return cls.from_laion_state_dict(state_dict, **init_args)

    def forward(self, videos: Tensor, prompts: list[str] | None = None, references: Tensor | None = None,
                fps: float | None = None) -> dict[str, Tensor]:
        b, t = videos.shape[:2]
        frames = videos[:, frame_indices(t, self.num_frames, videos.device)]  # (b, k, c, h, w)
        k = frames.shape[1]
        embeds = F.normalize(self.image_encoder(frames.flatten(0, 1)).float(), dim=-1)  # (b * k, d)
        score = self.head(embeds.to(self.head[0].weight.dtype)).view(b, k).float().mean(1)  # (b,)
        return {"aesthetic": score, "overall": score}
