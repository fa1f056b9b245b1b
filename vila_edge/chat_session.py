"""`vila-edge chat`: one question, or an interactive session with slash commands.

    /image PATH   add an image to the next question (repeatable; also after the first turn)
    /video PATH   ask the next question about a video (file, GIF or folder of frames)
    /clear        forget the conversation and any pending media
    /quit         leave (also: exit, quit, Ctrl-D)
Blank lines are ignored; any other line is a question. In interactive mode an error in one turn
(a missing image, a prompt too long) is printed as one line and the session goes on.
"""
import json
import os
import sys

from vila_edge.errors import ImageError, VilaEdgeError
from vila_edge.llm import KVConfig
from vila_edge.sampling import GenerationConfig

QUIT = ("/quit", "/exit", "exit", "quit")
HELP = __doc__.split("\n\n")[1]


def _check_file(path: str, what: str) -> str:
    if "://" not in path and not os.path.exists(path):
        raise ImageError(f"{path}: {what} not found")
    return path


class ChatSession:
    def __init__(self, args):
        self.args = args
        self.gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                        stop=tuple(args.stop))
        GenerationConfig(**self.gen)           # the CLI's ranges are the dataclass's; checked before loading
        self.images = [_check_file(p, "image file") for p in args.image]
        self.video = _check_file(args.video, "video") if args.video else None

    def run(self) -> int:
        from vila_edge.pipeline import Pipeline
        a = self.args
        pipe = Pipeline(None if a.model == "bundled" else a.model, threads=a.threads, max_context=a.max_context,
                        kv=KVConfig(block_size=a.block_size, budget=a.kv_budget), device=a.device)
        self.conv = pipe.conversation(a.system)
        try:
            if a.prompt is not None:
                self.turn(a.prompt)
            if a.interactive:
                self.loop(pipe)
        finally:
            self.conv.close()
        return 0

    def turn(self, prompt: str) -> None:
        images, video = self.images or None, self.video
        if self.args.json:
            text = self.conv.send(images, prompt, video=video, **self.gen)
            print(json.dumps({"answer": text, "stats": self.conv.last_stats}, ensure_ascii=False), flush=True)
        else:
            for piece in self.conv.stream(images, prompt, video=video, **self.gen):
                print(piece, end="", flush=True)
            print()
        if self.args.stats:
            print(json.dumps(self.conv.last_stats), file=sys.stderr, flush=True)
        self.images, self.video = [], None

    def loop(self, pipe) -> None:
        ask = "> " if sys.stdin.isatty() else ""
        while True:
            try:
                line = input(ask).strip()
            except EOFError:
                return
            if not line:
                continue
            if line.lower() in QUIT:
                return
            try:
                if line.startswith("/"):
                    self.command(pipe, line)
                else:
                    self.turn(line)
            except VilaEdgeError as e:
                print(f"vila-edge: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)

    def command(self, pipe, line: str) -> None:
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/image", "/video") and not arg:
            raise ImageError(f"{cmd} needs a path: {cmd} PATH")
        if cmd == "/image":
            self.images.append(_check_file(arg, "image file"))
            print(f"[image {arg} added to the next question]", file=sys.stderr, flush=True)
        elif cmd == "/video":
            self.video = _check_file(arg, "video")
            print(f"[video {arg} added to the next question]", file=sys.stderr, flush=True)
        elif cmd == "/clear":
            self.conv.close()
            self.conv = pipe.conversation(self.args.system)
            self.images, self.video = [], None
            print("[conversation cleared]", file=sys.stderr, flush=True)
        elif cmd == "/help":
            print(HELP, file=sys.stderr, flush=True)
        else:
            print(f"[unknown command {cmd}; commands: /image PATH, /video PATH, /clear, /quit, /help]",
                  file=sys.stderr, flush=True)
