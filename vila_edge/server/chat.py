"""A chat-completions request as engine work: messages -> a ChatTask (history + question + options)
-> a Conversation replaying the history, then the last user turn, streamed as events.

The history is rendered exactly as a Conversation that had lived through those turns renders it
(Conversation.add_turn), so the prompt of turn n+1 starts with the tokens of turn n's prompt and
the Pipeline's prefix cache reuses their KV blocks (usage.prompt_tokens_details.cached_tokens).
"""
from dataclasses import dataclass, field

from vila_edge.errors import IncompleteOutput, RequestError
from vila_edge.server.images import ImagePolicy, load_image_url
from vila_edge.server.schema import ChatRequest, ImagePart
from vila_edge.splice import PLACEHOLDER


@dataclass(frozen=True)
class Limits:
    max_images: int = 8                  # per request, all messages together
    max_prompt_tokens: int | None = None  # None: the engine's context
    images: ImagePolicy = field(default_factory=ImagePolicy)


@dataclass
class Turn:
    role: str
    text: str                            # one family part_text per image, at its position
    images: list = field(default_factory=list)    # PIL images


def parse_messages(req: ChatRequest, part_text: str, limits: Limits) -> tuple:
    """(system text or None, [Turn]) with images decoded; the last turn is the user's question."""
    system, turns, n_images = None, [], 0
    for i, m in enumerate(req.messages):
        if m.role in ("system", "developer"):
            if turns:
                raise RequestError(f"messages[{i}]: a {m.role} message must come before the conversation",
                                   param=f"messages[{i}].role")
            system = (system + "\n" if system else "") + _text_only(m.content, i)
            continue
        parts = [m.content or ""] if isinstance(m.content, (str, type(None))) else m.content
        if m.role == "assistant" and any(isinstance(p, ImagePart) for p in parts):
            raise RequestError(f"messages[{i}]: assistant messages cannot hold images", param=f"messages[{i}].content")
        text, images = "", []
        for j, p in enumerate(parts):
            if isinstance(p, ImagePart):
                n_images += 1
                if n_images > limits.max_images:
                    raise RequestError(f"more than {limits.max_images} images in one request", code="too_many_images",
                                       param=f"messages[{i}].content[{j}]")
                images.append(load_image_url(p.image_url.url, limits.images))
                text += part_text
            else:
                s = p if isinstance(p, str) else p.text
                if PLACEHOLDER in s:
                    raise RequestError(f"messages[{i}]: text may not contain {PLACEHOLDER!r}; send images as "
                                       "image_url parts", param=f"messages[{i}].content")
                text += s
        turns.append(Turn(m.role, text, images))
    if not turns or turns[-1].role != "user":
        raise RequestError("the last message must be the user's", param="messages")
    return system, turns


def _text_only(content, i: int) -> str:
    if isinstance(content, str) or content is None:
        return content or ""
    if any(isinstance(p, ImagePart) for p in content):
        raise RequestError(f"messages[{i}]: system messages cannot hold images", param=f"messages[{i}].content")
    return "".join(p.text for p in content)


@dataclass
class ChatTask:
    """One chat request as data: what a scheduler needs to run it, alone or batched with others.
    run() is the unbatched path: one Conversation on the calling worker thread."""
    system: str | None
    turns: list                          # [Turn]; the last is the user's question
    gen: dict                            # GenerationConfig fields
    limits: Limits

    def run(self, pipe, job) -> None:
        """Emits ("text", piece)..., then ("done", stats); closes the conversation on every path."""
        conv = pipe.conversation(self.system)
        try:
            for t in self.turns[:-1]:
                conv.add_turn(t.role, t.text, t.images)
            last = self.turns[-1]
            _check_prompt(pipe, conv, last, self.limits)
            pieces, reason = conv.stream(last.images or None, last.text, **self.gen), None
            try:
                for piece in pieces:
                    if job.cancelled.is_set():
                        reason, job.interrupted = "cancelled", True
                        break
                    job.emit("text", piece)
            except IncompleteOutput:
                reason = "length"     # OpenAI's meaning: the budget ended the answer
            finally:
                pieces.close()
            stats = dict(conv.last_stats)
            stats["finish_reason"] = reason or stats.get("finish_reason", "stop")
            job.emit("done", stats)
        finally:
            conv.close()              # frees the sequence's KV blocks


def _check_prompt(pipe, conv, last: Turn, limits: Limits) -> None:
    """Refuse a prompt over the server's token limit before any LLM work (images count in full)."""
    if limits.max_prompt_tokens is None:
        return
    counts, digests = list(conv.tiles_per_image), list(conv.digests)
    for im in last.images:        # features are cached by digest: stream() will not encode again
        digests += pipe.vision.encode(im)[1]
        counts.append(len(digests) - sum(counts))
    text = pipe.splicer.expand(pipe.template.render(conv.messages + [("user", last.text)], conv.system), counts)
    n = len(pipe.splicer.splice(text, digests).ids)
    if n > limits.max_prompt_tokens:
        raise RequestError(f"the prompt is {n} tokens, over this server's limit of {limits.max_prompt_tokens}",
                           code="context_length_exceeded", param="messages")
