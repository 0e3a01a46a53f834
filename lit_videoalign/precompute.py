"""Deprecated home of ``videoalign precompute``; the code lives in :mod:`lit_videoalign.data.precompute` (beside its
reader, :mod:`lit_videoalign.data.video_folder`) and :mod:`lit_videoalign.data.encoder_fingerprint`.

Importing this module still works for one release and warns once (``DeprecationWarning``).
"""

import warnings

from lit_videoalign.data.encoder_fingerprint import (
    MUST_MATCH,
    NOT_ENCODING_OPTIONS,
    WEIGHT_SAMPLE,
    backbone_fingerprint,
    check_backbone,
    encoder_modules,
)
from lit_videoalign.data.precompute import precompute, precompute_datamodule

warnings.warn("lit_videoalign.precompute moved to lit_videoalign.data.precompute (check_backbone and "
              "backbone_fingerprint to lit_videoalign.data.encoder_fingerprint); import from there, the old path "
              "goes away in the next release", DeprecationWarning, stacklevel=2)

__all__ = ["MUST_MATCH", "NOT_ENCODING_OPTIONS", "WEIGHT_SAMPLE", "backbone_fingerprint", "check_backbone",
           "encoder_modules", "precompute", "precompute_datamodule"]
