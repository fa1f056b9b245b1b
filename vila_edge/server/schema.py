"""OpenAI chat-completions request bodies, validated with pydantic (a wrong type is a 400 that
names the field). Fields OpenAI defines that this engine cannot honour are refused when they ask
for something (logprobs, tools, penalties); unknown fields are ignored, as OpenAI's SDKs add some."""
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore")     # clients send fields we do not use (name, detail)


class ImageURL(_Open):
    url: str


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Union[TextPart, ImagePart]


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Part], None] = None


class JSONSchemaFormat(_Open):
    name: str = "response"
    schema_: dict = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(_Open):
    include_usage: bool = False


class ChatRequest(_Open):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)      # greedy unless asked: robots want repeatable
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)                           # vila_edge / vLLM extension
    repetition_penalty: float = Field(default=1.0, gt=0.0)        # vila_edge / vLLM extension
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    guided_choice: list[str] | None = None                        # vLLM's names for choices / regex
    guided_regex: str | None = None
    # OpenAI fields this engine cannot honour: refused when they ask for something (app.unsupported).
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    functions: list | None = None
    tool_choice: Union[str, dict, None] = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None

    def unsupported(self) -> str | None:
        """The first field set to something this engine cannot do, or None."""
        asks = {"logprobs": self.logprobs, "top_logprobs": self.top_logprobs, "tools": self.tools,
                "functions": self.functions, "tool_choice": self.tool_choice not in (None, "none") or None,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "logit_bias": self.logit_bias}
        return next((k for k, v in asks.items() if v), None)


class ImageRequest(_Open):
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=4)
    response_format: Literal["b64_json"] = "b64_json"
    cfg_scale: float = Field(default=3.0, ge=0.0)
    temperature: float = Field(default=1.0, gt=0.0)
    top_k: int = Field(default=900, ge=0)
    top_p: float = Field(default=0.96, gt=0.0, le=1.0)
    seed: int | None = None
