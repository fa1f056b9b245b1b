"""Checkpoint weights checked before they become an engine.

A NaN or Inf weight exports without complaint and the engine then answers "" (every logit NaN);
a tensor missing from the safetensors or shaped unlike its config fails deep inside the graph
builders with a KeyError or a shape error. Both are faults of the checkpoint and are reported as
CheckpointError naming it.
"""
from contextlib import contextmanager

import numpy as np

from vila_edge.errors import CheckpointError, VilaEdgeError

# Rows per finiteness check: bounds the temporary boolean mask on multi-GB tensors.
CHUNK_ROWS = 4096


def check_finite(tensors: dict, where: str) -> dict:
    """Raise CheckpointError naming the first tensor with a NaN or Inf; returns `tensors`."""
    for name, w in tensors.items():
        a = np.asarray(w)
        if not np.issubdtype(a.dtype, np.floating):
            continue
        rows = a.reshape(len(a), -1) if a.ndim > 1 else a.reshape(1, -1)
        for lo in range(0, len(rows), CHUNK_ROWS):
            chunk = rows[lo:lo + CHUNK_ROWS]
            finite = np.isfinite(chunk)
            if not finite.all():
                bad = int((~finite).sum())
                raise CheckpointError(f"{where}: tensor {name} has {bad}+ NaN/Inf values (from row {lo}); "
                                      f"the checkpoint is corrupt or was saved after training diverged, and an "
                                      f"engine from it would answer nothing; re-download or re-save it")
    return tensors


@contextmanager
def checkpoint_faults(root: str):
    """Errors from reading a checkpoint's weights and tokenizer files into an engine (a missing tensor,
    a wrong shape, a tokenizer_config.json that is not an object) name the checkpoint."""
    try:
        yield
    except VilaEdgeError:
        raise
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{root}: its weights do not match its config ({type(e).__name__}: "
                              f"{str(e)[:300]}); the checkpoint is incomplete or from another model") from e
