from feat_helpers import audio_corpus  # noqa: F401  (fixture)
