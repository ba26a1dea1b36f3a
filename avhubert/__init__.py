"""AV-HuBERT (Shi et al. 2022) as a fairseq user-dir plugin: ``--user-dir avhubert``.

Registers the model ``av_hubert``, the task ``av_hubert_pretraining`` and the criterion ``av_hubert``.
"""
from . import criterion, model, task  # noqa: F401  (registration side effects)
from .model import AVHubertConfig, AVHubertModel  # noqa: F401
