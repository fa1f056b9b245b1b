"""Chat templates: VILA's conversation styles (NVlabs/VILA@1c88211:llava/conversation.py).

`render(messages)` returns the exact prompt string VILA builds, ending with the assistant's turn
opening so generation continues from there. Messages are (role, text) with role "user" or
"assistant"; images stay as "<image>" placeholders inside the text.
"""
import re
from dataclasses import dataclass

from vila_edge.errors import TemplateError
from vila_edge.text_ids import Segment

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
            raise TemplateError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        msgs = ([{"role": "system", "content": system}] if system is not None else [])
        msgs += [{"role": r, "content": t} for r, t in messages]
        bos, eos = self.special or ("", "")
        try:
            return env.from_string(self.source).render(messages=msgs, add_generation_prompt=True,
                                                       bos_token=bos, eos_token=eos)
        except TemplateError:
            raise
        except Exception as e:  # jinja2's TemplateSyntaxError, UndefinedError, SecurityError, ...
            raise TemplateError(f"chat template failed to render ({type(e).__name__}: {e}); fix the "
                                f"engine's chat_template.jinja or rebuild the engine") from e


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
            raise TemplateError("template 'auto' needs the tokenizer's chat_template, and none was found")
        return Jinja("auto", (), jinja_source, special)
    raise TemplateError(f"unknown chat template {name!r}; known: vicuna_v1, llama_3, hermes-2, auto")


# Stand-ins for message contents while a template renders: private-use code points, which the
# templates' own text never contains, so everything outside them is the template's.
_SLOT = "\ue000{}\ue001"
_SLOTS = re.compile("\ue000(\\d+)\ue001")


def render_segments(template: Template, messages: list, system=None) -> list:
    """template.render as Segments: the template's text trusted, every message's text (and the
    system prompt) untrusted. Messages are (role, content); content is a str or a list of
    Segments (text parts and image placeholders, see pipeline.user_message)."""
    contents = [c for _, c in messages] + ([system] if system is not None else [])
    slots = [(role, _SLOT.format(i)) for i, (role, _) in enumerate(messages)]
    rendered = template.render(slots, None if system is None else _SLOT.format(len(messages)))
    out, pos = [], 0
    for m in _SLOTS.finditer(rendered):
        out.append(Segment(rendered[pos:m.start()], trusted=True))
        content = contents[int(m.group(1))]
        out += [Segment(content)] if isinstance(content, str) else list(content)
        pos = m.end()
    out.append(Segment(rendered[pos:], trusted=True))
    return [s for s in out if s.text]
