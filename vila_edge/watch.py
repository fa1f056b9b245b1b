"""pipe.watch(source, prompt, every_s=...): answers about a live or recorded source as frames arrive.

A Camera is polled on the wall clock: every `every_s` seconds its current window (the last N
frames) is asked about, so answers always concern the newest frames however long the model takes.
Any other source (a video file or URL, or an iterable of frames) is read in step
with the answers on its own timeline: a question at source time 0, every_s, 2*every_s, ... about
the frames in the window at that moment -- so a recorded clip gives the same answers on any host.
A device index, /dev/video* or RTSP URL is opened as a Camera(source, window, interval_s).
One frame in the window is asked about as an image, several as a video (sampled to the engine's
num_video_frames).
"""
import time
from dataclasses import dataclass, field

from vila_edge.errors import UsageError
from vila_edge.sources import RTSP, Camera, FrameWindow, video_frames


@dataclass
class WatchAnswer:
    text: str
    t: float              # source time (seconds) of the newest frame asked about
    frames: int           # frames in the window asked about
    stats: dict = field(default_factory=dict)


def _ask(pipe, window: list, prompt: str, gen: dict) -> WatchAnswer:
    frames = [f for _, f in window]
    with pipe.conversation() as conv:
        if len(frames) == 1:
            text = conv.send(frames[0], prompt, **gen)
        else:
            text = conv.send(None, prompt, video=frames, **gen)
        return WatchAnswer(text, window[-1][0], len(frames), dict(conv.last_stats))


def _is_live(source) -> bool:
    """A device or stream: read on a thread so answers never fall behind it."""
    return isinstance(source, int) or (isinstance(source, str) and source.startswith(RTSP + ("/dev/video",)))


def _timed(frames):
    """(t, frame) pairs: as given, or stamped with arrival time for plain frames."""
    t0 = time.monotonic()
    for item in frames:
        yield item if isinstance(item, tuple) else (time.monotonic() - t0, item)


def watch(pipe, source, prompt: str, every_s: float = 1.0, window: int = 8, interval_s: float = 0.0, **gen):
    """Yield a WatchAnswer every `every_s` seconds of the source (see the module docstring)."""
    if not every_s > 0:
        raise UsageError(f"every_s must be > 0, got {every_s}")
    if isinstance(source, Camera):          # its own window and interval apply
        yield from _watch_camera(pipe, source, prompt, every_s, gen)
        return
    if _is_live(source):
        yield from _watch_camera(pipe, Camera(source, window, interval_s), prompt, every_s, gen)
        return
    frames = _timed(source) if hasattr(source, "__iter__") and not isinstance(source, str) else video_frames(source)
    win, due = FrameWindow(window, interval_s), None
    for t, frame in frames:
        win.push(t, frame)
        due = t if due is None else due
        if t >= due:
            yield _ask(pipe, win.snapshot(), prompt, gen)
            due += every_s * (1 + int((t - due) // every_s))


def _watch_camera(pipe, cam: Camera, prompt: str, every_s: float, gen: dict):
    started = cam.started
    if not started:
        cam.start()
    try:
        last_t = None
        while cam.wait_newer(last_t):
            t_ask = time.monotonic()
            ans = _ask(pipe, cam.frames(), prompt, gen)
            last_t = ans.t
            yield ans
            time.sleep(max(0.0, t_ask + every_s - time.monotonic()))
    finally:
        if not started:
            cam.close()
