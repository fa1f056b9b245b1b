"""The seam between HTTP and the engine: requests queue here and run on a bounded worker pool.

A Job carries one request's task (chat.ChatTask: history, question, generation options, as data)
and the events it produces ("text" pieces, then "done" or "error") to the asyncio side.
ThreadScheduler runs each task (task.run) on one of `workers` threads sharing the Pipeline: a
worker decodes images, renders the prompt and relays text, while the LLM work of every worker's
request goes to the Pipeline's scheduler (vila_edge/scheduler.py), which runs the decode steps of
all of them as one batch per step. `workers` is therefore the most requests generating at once
(the batch); a job cancelled between pieces closes its stream, and the scheduler frees its KV
blocks at its next step.
"""
import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from vila_edge.errors import RequestError


class Job:
    def __init__(self, task, loop: asyncio.AbstractEventLoop):
        self.task = task                     # has run(pipe, job): emits events from a worker
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()   # set when the client went away or the server stops
        self.interrupted = False             # set by the work when it stopped early for that
        self.checked_at = time.monotonic()   # when the request last checked its client was there

    def emit(self, kind: str, value=None) -> None:
        """Thread-safe: hand an event to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:                  # the loop closed under a shutdown: nobody listens
            pass

    def cancel(self) -> None:
        self.cancelled.set()


class ThreadScheduler:
    def __init__(self, pipe, workers: int, max_queue: int):
        self.pipe = pipe
        if workers < 1 or max_queue < 0:
            raise ValueError(f"workers must be >= 1 and max_queue >= 0, got {workers} and {max_queue}")
        self.workers, self.max_queue = workers, max_queue
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="vila-edge-worker")
        self._lock = threading.Lock()
        self._queued = self._running = self._interrupted = 0
        self._closing = False
        self._jobs = set()

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._closing:
                raise RequestError("the server is shutting down", status=503, code="shutting_down")
            if self._queued >= self.max_queue + max(0, self.workers - self._running):
                raise RequestError(f"the server is busy: {self._running} requests running and {self._queued} "
                                   f"queued (limit {self.max_queue}); retry later", status=429, code="queue_full")
            self._queued += 1
            self._jobs.add(job)
        self._pool.submit(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        with self._lock:
            self._queued -= 1
            self._running += 1
        try:
            if job.cancelled.is_set():
                job.interrupted = True
                job.emit("error", RequestError("cancelled before it started", status=499, code="cancelled"))
                return
            job.task.run(self.pipe, job)
        except BaseException as e:           # delivered to the request, which maps it to a status
            job.emit("error", e)
        finally:
            with self._lock:
                self._running -= 1
                self._interrupted += job.interrupted
                self._jobs.discard(job)

    def stats(self) -> dict:
        with self._lock:
            return {"queued": self._queued, "running": self._running, "workers": self.workers,
                    "interrupted": self._interrupted}

    def shutdown(self, cancel: bool) -> None:
        """Refuse new jobs; with cancel, ask the running ones to stop at their next token. Waits."""
        with self._lock:
            self._closing = True
            jobs = list(self._jobs) if cancel else []
        for job in jobs:
            job.cancel()
        self._pool.shutdown(wait=True)
