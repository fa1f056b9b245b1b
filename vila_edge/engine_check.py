"""An engine directory checked against its own graphs and tables before the first request.

The manifest says what the graphs are; a manifest edited by hand, a graph copied from another
engine, or two graphs swapped would otherwise run: a wrong `tokens_per_image` overwrites prompt rows
with image features or leaves rows uninitialised, a wrong vocabulary size samples ids the tokenizer
cannot decode. Everything here reads shapes and dtypes only (no inference), so loading stays fast.
"""
import os

import numpy as np

from vila_edge.errors import EngineError

ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32"}
EMBED_DTYPES = ("float32", "float16")


def _io(session, what: str) -> dict:
    """name -> (shape with symbolic dims as None, numpy dtype name) of a session's inputs or outputs."""
    args = session.get_inputs() if what == "inputs" else session.get_outputs()
    return {a.name: ([d if isinstance(d, int) else None for d in a.shape], ORT_DTYPES.get(a.type, a.type))
            for a in args}


def _expect(io: dict, name: str, shape: list, dtype: str, graph: str, field_hint: str, fix: str,
            dtype_field: str = "dtype") -> None:
    """io[name] must exist with `dtype` and, where both are known, `shape` (None: any size)."""
    if name not in io:
        raise EngineError(f"{graph} has no {name!r} (it has {sorted(io)[:6]}): this is not the engine's "
                          f"{graph.split('/')[-1]} graph (copied or swapped files?); {fix}")
    got_shape, got_dtype = io[name]
    if got_dtype != dtype:
        raise EngineError(f"{graph}: {name} is {got_dtype} but manifest.json {dtype_field} says {dtype}; {fix}")
    if len(got_shape) != len(shape) or any(g is not None and w is not None and g != w
                                           for g, w in zip(got_shape, shape)):
        raise EngineError(f"{graph}: {name} has shape {got_shape} but manifest.json ({field_hint}) implies "
                          f"{shape}; {fix}")


def check_vision(session, manifest, path: str, fix: str) -> None:
    io_in, io_out = _io(session, "inputs"), _io(session, "outputs")
    v, size = manifest.vision, manifest.vision.image_size
    _expect(io_in, "pixel_values", [None, 3, size, size], manifest.dtype, path, "vision.image_size", fix)
    _expect(io_out, "image_features", [None, v.tokens_per_image, manifest.llm.hidden], manifest.dtype, path,
            "vision.tokens_per_image, llm.hidden", fix)


def check_llm(session, manifest, path: str, fix: str) -> None:
    """The standard-op graph: one sequence, the past as rows (docs/contracts.md)."""
    io_in = _io(session, "inputs")
    m = manifest.llm
    _expect(io_in, "inputs_embeds", [1, None, m.hidden], manifest.dtype, path, "llm.hidden", fix)
    _check_layers(io_in, manifest, path, fix, "past_k_", ("past_k", "past_v"), [None, m.kv_heads, m.head_dim])
    _check_logits(_io(session, "outputs"), manifest, path, fix)


def check_paged_llm(session, manifest, path: str, fix: str) -> None:
    """The fused graph: B sequences' flattened tokens over the pool's blocks (docs/contracts.md)."""
    io_in = _io(session, "inputs")
    m = manifest.llm
    _expect(io_in, "inputs_embeds", [None, m.hidden], manifest.dtype, path, "llm.hidden", fix)
    for name in ("block_tables", "seq_lens", "query_start_loc", "slot_mapping"):
        _expect(io_in, name, [None] * (2 if name == "block_tables" else 1), "int32", path, "build.graph", fix)
    _check_layers(io_in, manifest, path, fix, "key_cache_", ("key_cache", "value_cache"),
                  [None, None, m.kv_heads, m.head_dim], manifest.kv_dtype)
    _check_logits(_io(session, "outputs"), manifest, path, fix)


def _check_layers(io_in: dict, manifest, path: str, fix: str, prefix: str, kinds: tuple, shape: list,
                  dtype: str | None = None) -> None:
    m = manifest.llm
    found = sorted(n for n in io_in if n.startswith(prefix))
    if len(found) != m.layers:
        raise EngineError(f"{path}: {len(found)} layers of {prefix}* inputs but manifest.json llm.layers says "
                          f"{m.layers}; {fix}")
    for layer in range(m.layers):
        for kind in kinds:
            _expect(io_in, f"{kind}_{layer}", shape, dtype or manifest.dtype, path, "llm.kv_heads, llm.head_dim", fix,
                    "kv_dtype" if dtype else "dtype")


def _check_logits(io_out: dict, manifest, path: str, fix: str) -> None:
    m = manifest.llm
    logits = io_out.get("logits")
    if logits is None:
        raise EngineError(f"{path} has no 'logits' output: this is not the engine's llm graph; {fix}")
    rows = logits[0][-1]
    if rows is not None and rows != m.logits_size:
        raise EngineError(f"{path}: logits have {rows} rows but manifest.json llm.logits_size says "
                          f"{m.logits_size}; {fix}")
    if not m.vocab_size <= m.logits_size:
        raise EngineError(f"manifest.json: llm.vocab_size {m.vocab_size} exceeds llm.logits_size "
                          f"{m.logits_size}; {fix}")


def load_embeddings(path: str, manifest, fix: str) -> np.ndarray:
    """embed_tokens.npy as a read-only memory map, never unpickled, checked against the manifest."""
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise EngineError(f"{path}: not a numpy array file this runtime can map ({e}); {fix}") from e
    m = manifest.llm
    if not isinstance(table, np.ndarray) or table.dtype.name not in EMBED_DTYPES or table.ndim != 2:
        raise EngineError(f"{path}: expected a 2-D float16/float32 table, got "
                          f"{getattr(table, 'dtype', type(table).__name__)} {getattr(table, 'shape', '')}; {fix}")
    if table.shape[1] != m.hidden or table.shape[0] < m.vocab_size:
        raise EngineError(f"{path}: table is {list(table.shape)} but manifest.json says at least "
                          f"{m.vocab_size} rows (llm.vocab_size) of {m.hidden} (llm.hidden); {fix}")
    return table


def check_token_ids(manifest, n_rows: int, vocab: int, fix: str) -> None:
    """Ids the runtime feeds or stops on must exist: stop/bos ids in the tokenizer, bos in the table."""
    t = manifest.tokens
    ids = {"tokens.bos_id": [t.bos_id] if t.bos_id is not None else [], "tokens.stop_ids": t.stop_ids}
    for field, values in ids.items():
        bad = [i for i in values if not 0 <= i < vocab]
        if bad:
            raise EngineError(f"manifest.json: {field} {bad} are outside the tokenizer's {vocab} ids; {fix}")
    if t.bos_id is not None and t.bos_id >= n_rows:
        raise EngineError(f"manifest.json: tokens.bos_id {t.bos_id} has no row in the {n_rows}-row "
                          f"embedding table; {fix}")


def load_tokenizer(path: str, fix: str):
    """tokenizer.json, with tokenizers' own exception (pyo3) for a corrupt file turned into ours."""
    from tokenizers import Tokenizer

    if not os.access(path, os.R_OK):
        raise EngineError(f"{path}: permission denied; make the engine directory readable by this user "
                          f"(chmod -R a+rX {os.path.dirname(path) or '.'})")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises plain Exception subclasses from Rust
        raise EngineError(f"{path}: not a tokenizer this runtime can read ({str(e)[:200]}); {fix}") from e
