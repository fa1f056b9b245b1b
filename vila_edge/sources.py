"""Video and live frames in: lazy video files, frame iterators, cameras and RTSP streams.

    frames = sample_frames("clip.mp4", 8)             # seeks to 8 evenly spaced frames; never decodes the rest
    frames = sample_frames(my_generator(), 8)         # any iterable of frames, memory bounded (see below)
    with Camera(0, window=8, interval_s=0.5) as cam:  # /dev/video0; also "rtsp://...", a file or URL
        for ans in pipe.watch(cam, "Is anyone in the aisle?", every_s=2.0):
            print(f"{ans.t:.1f}s {ans.text}")

Decoding uses PyAV (the `[video]` extra): its wheels exist for aarch64 (Jetson) and x86_64, bundle
FFmpeg (V4L2, RTSP, H.264/H.265 files) and weigh less than OpenCV's (32.7 vs 36.5-39.6 MB,
manylinux aarch64, on PyPI in 2026). Memory is bounded by the frames kept, never the clip length.
A frame is an HWC uint8 RGB array; sources yield (t seconds, frame).
"""
import collections
import os
import threading
import time
from fractions import Fraction

import numpy as np
from PIL import Image

from vila_edge.errors import ImageError, MissingExtraError
from vila_edge.preprocess import frame_indices, load_image

FRAME_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
RTSP = ("rtsp://", "rtsps://")


def import_av(what: str):
    try:
        import av
    except ImportError as e:
        raise MissingExtraError(f"{what} needs PyAV: pip install 'vila-edge[video]' (or pass a list of frames)") from e
    return av


def sample_frames(src, n: int) -> list:
    """`n` evenly spaced frames (PIL RGB, first and last included) of: a list of frames, a folder
    of images, an animated GIF, a video file/URL (lazy: seeks), a Camera (its current window), or
    any iterable of frames (kept at a doubling stride, at most 2n frames held at once)."""
    if isinstance(src, Camera):
        src.latest()                                   # waits for a first frame
        src = [f for _, f in src.frames()]
    if isinstance(src, (list, tuple)):
        return [load_image(src[i]) for i in frame_indices(len(src), n)]
    if isinstance(src, (str, os.PathLike)):
        return _sample_path(os.fspath(src), n)
    if isinstance(src, (np.ndarray, Image.Image)) or not hasattr(src, "__iter__"):
        raise ImageError(f"video must be a path, a list or an iterable of frames, got {type(src).__name__}")
    return _stride_sample(iter(src), n)


def _sample_path(path: str, n: int) -> list:
    if path.startswith(RTSP + ("/dev/video",)):
        raise ImageError(f"{path} is a live source with no end to sample to: open it as Camera({path!r}) and "
                         f"pass the camera (its window is the video) or use pipe.watch")
    if os.path.isdir(path):
        names = sorted(x for x in os.listdir(path) if x.lower().endswith(FRAME_EXTS))
        return sample_frames([os.path.join(path, x) for x in names], n)
    if "://" not in path and not os.path.isfile(path):
        raise ImageError(f"{path}: video not found")
    if path.lower().endswith(".gif"):
        with Image.open(path) as gif:
            frames = []
            for i in frame_indices(getattr(gif, "n_frames", 1), n):
                gif.seek(int(i))
                frames.append(gif.convert("RGB"))
            return frames
    return _seek_sample(path, n)


def _stride_sample(frames, n: int, convert=None) -> list:
    """Evenly spaced frames of an iterator of unknown length: keep every `stride`-th frame and
    double the stride (dropping every other kept frame) whenever 2n are held. Only kept frames
    are converted (`convert`, default load_image; (t, frame) pairs give their frame)."""
    convert = convert or (lambda f: load_image(f[1] if isinstance(f, tuple) else f))
    kept, stride = [], 1
    for i, frame in enumerate(frames):
        if i % stride == 0:
            kept.append(convert(frame))
            if len(kept) == 2 * n:
                kept, stride = kept[::2], stride * 2
    return [kept[i] for i in frame_indices(len(kept), n)]


def _seek_sample(path: str, n: int) -> list:
    """VILA's linspace frame choice (NVlabs/VILA@33b4f1a55cc0fc6b8be138d5097cf7ad8ec487fc:
    llava/utils/media.py `_load_video`), by seeking to each chosen frame's timestamp."""
    av = import_av(f"{path}: decoding a video file")
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not stream.frames or not rate:
                return _stride_sample(container.decode(stream), n, lambda f: f.to_image())
            step = 1 / (Fraction(rate) * stream.time_base)         # stream time units per frame
            start = stream.start_time or 0
            out = []
            for i in frame_indices(stream.frames, n):
                frame = _frame_at(container, stream, start + int(i * step), step / 2)
                if frame is None and not out:
                    raise ImageError(f"{path}: no frame could be decoded")
                out.append(frame if frame is not None else out[-1])
            return out
    except av.error.FFmpegError as e:
        raise ImageError(f"{path}: cannot decode video ({e})") from e


def _frame_at(container, stream, target: int, tolerance):
    """The first frame at or after `target` (stream time units); the last one if the stream ends
    first (frame counts in headers can be one or two high)."""
    container.seek(max(target, 0), stream=stream, backward=True, any_frame=False)
    last = None
    for frame in container.decode(stream):
        last = frame
        if frame.pts is not None and frame.pts >= target - tolerance:
            break
    return None if last is None else last.to_image()


def open_args(source) -> tuple:
    """(url, av.open keyword arguments) for a device index, /dev/video*, an RTSP URL, a file or URL."""
    if isinstance(source, int):
        source = f"/dev/video{source}"
    source = os.fspath(source)
    if source.startswith("/dev/video"):
        if not os.path.exists(source):
            raise ImageError(f"{source}: no such camera device (ls /dev/video* lists the cameras V4L2 sees)")
        return source, {"format": "v4l2"}
    if source.startswith(RTSP):
        return source, {"options": {"rtsp_transport": "tcp"}}
    if "://" not in source and not os.path.exists(source):
        raise ImageError(f"{source}: video source not found")
    return source, {}


def video_frames(source):
    """Yield (t seconds, HWC uint8 RGB) from a device, stream, file or URL, decoding lazily."""
    url, kwargs = open_args(source)
    av = import_av(f"{url}: reading video")
    try:
        with av.open(url, **kwargs) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                yield float(frame.time or 0.0), frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as e:
        raise ImageError(f"{url}: cannot read video ({e})") from e


class FrameWindow:
    """The last `size` frames, at most one per `interval_s` of source time."""

    def __init__(self, size: int = 8, interval_s: float = 0.0):
        if size < 1 or interval_s < 0:
            raise ImageError(f"frame window needs size >= 1 and interval_s >= 0, got {size}, {interval_s}")
        self.frames = collections.deque(maxlen=size)
        self.interval_s = interval_s

    def push(self, t: float, frame) -> bool:
        if self.frames and t - self.frames[-1][0] < self.interval_s:
            return False
        self.frames.append((t, frame))
        return True

    def snapshot(self) -> list:
        return list(self.frames)


class Camera:
    """A live source read on a background thread into a rolling window of its last `window` frames
    (one per `interval_s`); a slow consumer sees the newest frames, never a backlog. Files play at
    their own frame rate (realtime=True) so they stand in for a camera."""

    def __init__(self, source=0, window: int = 8, interval_s: float = 0.0, realtime: bool = True):
        self.source, self.realtime = source, realtime
        self.url, _ = open_args(source)
        self.window = FrameWindow(window, interval_s)
        self._lock, self._new = threading.Lock(), threading.Condition()
        self._stop, self._error, self._done = threading.Event(), None, False
        self._thread = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> "Camera":
        import_av(f"{self.url}: a camera")
        self._thread = threading.Thread(target=self._read, name=f"camera:{self.url}", daemon=True)
        self._thread.start()
        return self

    def _read(self):
        t0 = None
        try:
            for t, frame in video_frames(self.source):
                if self._stop.is_set():
                    break
                if self.realtime:
                    t0 = t0 if t0 is not None else time.monotonic() - t
                    time.sleep(max(0.0, t0 + t - time.monotonic()))
                with self._new:
                    self.window.push(t, frame)
                    self._new.notify_all()
        except BaseException as e:      # handed to the consumer: a thread cannot raise to it
            self._error = e
        finally:
            with self._new:
                self._done = True
                self._new.notify_all()

    def frames(self) -> list:
        """The current window: [(t, frame)], oldest first."""
        with self._new:
            if self._error is not None:
                raise self._error
            return self.window.snapshot()

    def latest(self, timeout: float | None = 10.0):
        """The newest frame (HWC uint8 RGB), waiting up to `timeout` s for the first one."""
        if not self.wait_newer(None, timeout):
            raise ImageError(f"{self.url}: no frame arrived within {timeout} s")
        return self.frames()[-1][1]

    def wait_newer(self, t: float | None, timeout: float | None = None) -> bool:
        """Block until a frame newer than `t` is in the window; False once the source has ended."""
        with self._new:
            ok = self._new.wait_for(lambda: self._error is not None or self._done or
                                    (self.window.frames and (t is None or self.window.frames[-1][0] > t)), timeout)
            if self._error is not None:
                raise self._error
            return bool(ok) and bool(self.window.frames) and (t is None or self.window.frames[-1][0] > t)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
