"""AV-HuBERT (Shi et al. 2022) as a fairseq user-dir plugin: ``--user-dir avhubert``.

Registers the model ``av_hubert``, the task ``av_hubert_pretraining``, the criterion ``av_hubert``
and the fine-tuning model ``av_hubert_seq2seq`` (``hubert_asr.py``), so that any fairseq entry
point given this user dir (training, ``load_model_ensemble_and_task``) knows all of them.

For use from Python (features and discrete units of a clip, no fairseq knowledge needed):
``model = avhubert.load("checkpoint.pt"); model.extract(video="clip.mp4", layer=9)`` (``api.py``).
"""
from . import criterion, model, task  # noqa: F401  (registration side effects)
from . import hubert_asr  # noqa: F401  (av_hubert_seq2seq; builds on model.AVHubertModel)
from .model import AVHubertConfig, AVHubertModel  # noqa: F401
from .api import AVHubert, load  # noqa: F401  (the Python API)
