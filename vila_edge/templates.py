"""Chat templates: VILA's conversation styles (NVlabs/VILA@1c88211:llava/conversation.py).

`render(messages)` returns the exact prompt string VILA builds, ending with the assistant's turn
opening so generation continues from there. Messages are (role, text) with role "user" or
"assistant"; images stay as "<image>" placeholders inside the text.
"""
from dataclasses import dataclass

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                 "gives helpful, detailed, and polite answers to the user's questions.")
LLAMA3_SYSTEM = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language "
                 "and vision assistant. You are able to understand the visual content that the user provides, "
                 "and assist the user with a variety of tasks using natural language.")
HERMES_SYSTEM = "<|im_start|>system\nAnswer the questions."


@dataclass(frozen=True)
class Template:
    name: str
    stop_texts: tuple   # texts that end the assistant's turn

    def render(self, messages: list, system: str | None = None) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Vicuna(Template):
    """SeparatorStyle.TWO: system + " " + "USER: m</s>"-alternating seps, then "ASSISTANT:"."""

    def render(self, messages, system=None):
        seps = (" ", "</s>")
        roles = {"user": "USER", "assistant": "ASSISTANT"}
        out = (VICUNA_SYSTEM if system is None else system) + seps[0]
        for i, (role, text) in enumerate(messages):
            out += roles[role] + ": " + text + seps[i % 2]
        return out + "ASSISTANT:"


@dataclass(frozen=True)
class HeaderStyle(Template):
    """SeparatorStyle.LLAMA_3 and MPT (hermes-2): system + sep, then role-header + msg + sep."""
    default_system: str = ""
    sep: str = ""
    user: str = ""
    assistant: str = ""

    def render(self, messages, system=None):
        out = (self.default_system if system is None else system) + self.sep
        for role, text in messages:
            out += (self.user if role == "user" else self.assistant) + text + self.sep
        return out + self.assistant


@dataclass(frozen=True)
class Jinja(Template):
    """NVILA "auto": the tokenizer's own chat template (tokenizer_config.json `chat_template`)."""
    source: str = ""
    special: tuple = ()  # (bos_token, eos_token) strings the template may reference

    def render(self, messages, system=None):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        msgs = ([{"role": "system", "content": system}] if system is not None else [])
        msgs += [{"role": r, "content": t} for r, t in messages]
        bos, eos = self.special or ("", "")
        return env.from_string(self.source).render(messages=msgs, add_generation_prompt=True,
                                                   bos_token=bos, eos_token=eos)


def get_template(name: str, jinja_source: str | None = None, special: tuple = ()) -> Template:
    if name == "vicuna_v1":
        return Vicuna("vicuna_v1", ("</s>",))
    if name == "llama_3":
        return HeaderStyle("llama_3", ("<|eot_id|>", "<|end_of_text|>"), LLAMA3_SYSTEM, "<|eot_id|>",
                           "<|start_header_id|>user<|end_header_id|>\n\n",
                           "<|start_header_id|>assistant<|end_header_id|>\n\n")
    if name == "hermes-2":
        return HeaderStyle("hermes-2", ("<|im_end|>",), HERMES_SYSTEM, "<|im_end|>",
                           "<|im_start|>user\n", "<|im_start|>assistant\n")
    if name == "auto":
        if not jinja_source:
            raise ValueError("template 'auto' needs the tokenizer's chat_template, and none was found")
        return Jinja("auto", (), jinja_source, special)
    raise ValueError(f"unknown chat template {name!r}")
