import sys
from pathlib import Path

import cloudpickle

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_toy_stages  # noqa: E402

# workers (local processes, Slurm jobs) cannot import tests/engine: ship the toy stages by value
cloudpickle.register_pickle_by_value(engine_toy_stages)
