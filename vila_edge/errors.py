"""Errors raised at vila_edge's boundaries. Each names the input, the field and what was expected."""


class VilaEdgeError(Exception):
    """Base class: every error a user can cause derives from this."""


class CheckpointError(VilaEdgeError):
    """A checkpoint directory has the wrong layout or an inconsistent config."""


class EngineError(VilaEdgeError):
    """An engine directory is missing files, corrupt, or built by another version."""


class ImageError(VilaEdgeError):
    """An image or video could not be read, or is outside the accepted limits."""


class PromptError(VilaEdgeError):
    """A prompt does not fit the model: too long, or its images do not match its placeholders."""


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
