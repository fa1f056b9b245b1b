"""Real English text available offline: the Python reference manual shipped as pydoc_data.topics.

The topics are split by a hash of their key into disjoint calibration and evaluation parts, so
quality is never measured on the text AWQ was calibrated on. The split depends only on the key
names (sha256, not Python's salted hash()); each part keeps sorted-key order. The text itself
comes with the interpreter, so numbers measured on it are tied to the Python version.
"""
import hashlib

from pydoc_data.topics import topics

SPLITS = ("calib", "eval")
EVAL_BUCKETS = 128  # first sha256 byte >= 128 -> eval, else calib: about half of the topics each


def split_of(key: str) -> str:
    return "eval" if hashlib.sha256(key.encode()).digest()[0] >= EVAL_BUCKETS else "calib"


def split_texts(split: str) -> list[str]:
    """The topic texts of one split, in sorted-key order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [topics[k] for k in sorted(topics) if split_of(k) == split]
