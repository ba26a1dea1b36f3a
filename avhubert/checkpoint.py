"""Reading fairseq checkpoints under torch >= 2.6, where ``torch.load`` defaults to
``weights_only=True`` and refuses the fairseq/omegaconf objects those checkpoints pickle.

The fix is scoped: inside :func:`fairseq_checkpoint_loading` the classes a fairseq checkpoint is
known to contain are allow-listed for the weights-only unpickler (nothing else is: arbitrary code
still cannot run). Outside it, ``torch.load`` behaves as torch ships it.
"""
import argparse
import collections
import contextlib
import typing
from typing import Any, Dict, List

import numpy as np
import torch


def _checkpoint_globals() -> List[Any]:
    from fairseq.data.dictionary import Dictionary
    from fairseq.distributed import utils as distributed_utils

    allowed: List[Any] = [Dictionary, argparse.Namespace, typing.Any, dict, list, set, tuple, int, float,
                          str, bool, collections.defaultdict, collections.OrderedDict]
    # fairseq's broadcast_object (resume on ranks > 0) pickles the state with tensors cut out
    if hasattr(distributed_utils, "_TensorPlaceholder"):
        allowed.append(distributed_utils._TensorPlaceholder)
    try:  # published checkpoints may carry an omegaconf DictConfig instead of a plain dict
        import omegaconf
        from omegaconf import base, nodes

        allowed += [omegaconf.DictConfig, omegaconf.ListConfig, base.ContainerMetadata, base.Metadata]
        allowed += [getattr(nodes, n) for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode",
                                                  "BooleanNode", "EnumNode", "PathNode", "BytesNode")
                    if hasattr(nodes, n)]
    except ImportError:
        pass
    # numpy scalars/arrays appear in extra_state (meters, best metric values)
    core = getattr(np, "_core", None) or np.core
    allowed += [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "int16",
                                             "int8", "uint8", "bool")]
    return allowed


_depth = 0


@contextlib.contextmanager
def fairseq_checkpoint_loading():
    """Allow-list fairseq checkpoint objects for torch.load(weights_only=True) in this block only.

    Covers the files fairseq writes (Dictionary in task_state, plain-dict or omegaconf cfg, argparse
    args of older versions, numpy scalars in extra_state) and the in-memory copies fairseq
    broadcasts from rank 0 when resuming distributed training (a DictConfig cfg)."""
    global _depth
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5: nothing to do, weights_only was not the default
        yield
        return
    # torch's safe_globals removes its entries on exit, even those an outer block still needs:
    # only the outermost block adds and removes them, so nested use is safe
    if _depth:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    with safe_globals(_checkpoint_globals()):
        _depth = 1
        try:
            yield
        finally:
            _depth = 0


def load_checkpoint_to_cpu(path: str) -> Dict[str, Any]:
    """fairseq.checkpoint_utils.load_checkpoint_to_cpu with the allow-list in force."""
    from fairseq import checkpoint_utils

    with fairseq_checkpoint_loading():
        return checkpoint_utils.load_checkpoint_to_cpu(path)
