"""Every error a user can cause, in one place. Each names the input, the field and what was expected.

The CLI prints a VilaEdgeError as one line and exits 2 (a server answers 4xx); anything else that
escapes the library is a bug. Classes that mirror a Python idiom also derive from it (a bad option
value is a ValueError, a wrong type a TypeError), so `except ValueError` keeps working.
"""


class VilaEdgeError(Exception):
    """Base class: every error a user can cause derives from this."""


class CheckpointError(VilaEdgeError):
    """A checkpoint directory has the wrong layout, an inconsistent config or unusable weights."""


class EngineError(VilaEdgeError):
    """An engine directory is missing files, corrupt, inconsistent with its graphs, or built by
    another version."""


class ExportError(VilaEdgeError):
    """An export cannot proceed without harming the user's files (an output directory that is not
    an engine, the checkpoint itself, one that cannot be written)."""


class ExportOptionError(VilaEdgeError, ValueError):
    """An export option (dtype, target, quant, lm_head_bits, ...) is unknown or inconsistent."""


class ImageError(VilaEdgeError):
    """An image or video could not be read, or is outside the accepted limits."""


class PromptError(VilaEdgeError):
    """A prompt does not fit the model: too long, not valid text, or its images do not match its
    placeholders."""


class TemplateError(VilaEdgeError, ValueError):
    """A chat template is unknown, missing, or failed while rendering."""


class GenerationConfigError(VilaEdgeError, ValueError):
    """A generation option (max_new_tokens, temperature, stop, ...) has the wrong type or value."""


class KVConfigError(VilaEdgeError, ValueError):
    """A KV cache setting (block size, wait time, pool size) is not usable."""


class KVBudgetError(KVConfigError):
    """A KV budget that cannot be parsed, or that leaves no room for one full context."""


class KVSequenceError(VilaEdgeError, ValueError):
    """A BlockManager call that does not fit a sequence's state (a duplicate id, bad keys, a commit
    beyond what was reserved)."""


class UnknownSequence(VilaEdgeError, KeyError):
    """A BlockManager call names a sequence that does not exist (never allocated, or freed)."""


class KVCacheFull(VilaEdgeError):
    """The KV pool has no room for a request (see the message for the numbers)."""


class MissingExtraError(VilaEdgeError):
    """An optional feature needs an extra that is not installed (the message names the pip command)."""


class UsageError(VilaEdgeError, ValueError):
    """A command-line or API option has a value outside its accepted range."""


class GrammarError(VilaEdgeError, ValueError):
    """A structured-output constraint (json_schema, choices, regex) cannot be compiled or followed."""


class IncompleteOutput(GrammarError):
    """Generation reached max_new_tokens before the structured answer was complete."""

    def __init__(self, message: str, text: str):
        super().__init__(message)
        self.text = text       # the partial answer


class RequestError(VilaEdgeError, ValueError):
    """A server request the engine cannot take: malformed, over a limit, or not allowed.
    `status` is the HTTP status the server answers with (4xx), `code` OpenAI's error code."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


class ServeError(VilaEdgeError):
    """`vila-edge serve` cannot start: its address is taken or unusable."""


class QuantConfigError(VilaEdgeError):
    """A quantization setting does not fit a layer (e.g. K not a multiple of the group size)."""


class QualityError(VilaEdgeError):
    """A quantized model is below the configured quality floor."""


class DeviceUnavailable(VilaEdgeError):
    """A requested device (cuda, tensorrt) is not usable here: the message names what is missing
    (onnxruntime-gpu, its CUDA or TensorRT execution provider, cuda-python, a GPU). Never a silent
    fallback to the CPU."""
