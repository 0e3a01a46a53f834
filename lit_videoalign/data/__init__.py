"""Datasets and Lightning data modules: the toy world, video folders, preference pairs, prompt files, precomputed
latents. Names load lazily (importing this package loads no Lightning); configs keep naming full class paths
(``lit_videoalign.data.toyworld.ToyWorldDataModule``).
"""

from lit_videoalign._exports import lazy_exports

_EXPORTS = {
    # the toy world: procedural physics videos, prompts, corruptions, labelled pairs
    "ToyWorld": "lit_videoalign.data.toyworld",
    "ToyWorldDataset": "lit_videoalign.data.toyworld",
    "ToyWorldDataModule": "lit_videoalign.data.toyworld",
    "ToyWorldPairs": "lit_videoalign.data.toyworld_pairs",
    "ToyWorldPairsDataModule": "lit_videoalign.data.toyworld_pairs",
    # your own data
    "VideoFolderDataset": "lit_videoalign.data.video_folder",
    "VideoFolderDataModule": "lit_videoalign.data.video_folder",
    "PreferenceDataset": "lit_videoalign.data.preference",
    "PreferenceDataModule": "lit_videoalign.data.preference",
    "PromptDataset": "lit_videoalign.data.prompts",
    "PromptFileDataModule": "lit_videoalign.data.prompts",
    # latents and prompt embeddings encoded once (``videoalign precompute``)
    "PrecomputedDataset": "lit_videoalign.data.precomputed",
    "check_backbone": "lit_videoalign.data.encoder_fingerprint",
    "ResumableDataLoader": "lit_videoalign.data.resumable",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
