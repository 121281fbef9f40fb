"""Encoders, decoders and the segmentor that joins them (registered by name)."""
from trainers.models import decoders, encoders  # noqa: F401  (fill the registries)
from trainers.models import clip  # noqa: F401  (clip_vit_* encoders, tconv decoders)
from trainers.models import mit, setr  # noqa: F401  (SegFormer mit_* / segformer_head, SETR vit_* / setr_naive*)
from trainers.models.segmentor import Segmentor, build_segmentor

__all__ = ["Segmentor", "build_segmentor"]
