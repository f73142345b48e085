"""Span recording for `--breakdown` and `--trace`: what each lane (compute, each I/O worker, the CUDA copy
streams) did and when, on the real schedule with overlap on.

A recorder is passed explicitly into the engine (no global timers). `NULL` records nothing: a span is then
one call returning a shared no-op context. On a CPU every span is a pair of perf_counter reads on the
calling thread's lane. On CUDA, spans given a `stream` lane are pairs of timing events recorded on the
current stream and resolved after the step (the engine synchronizes there anyway); other spans are host
spans, like the I/O threads' disk reads.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import torch

# stages: what a span was doing (cli/breakdown.py groups and rates them)
STEP = "schedule (other)"  # a step's own time outside every stage below: Python, sampling, hand-offs
COMPUTE = "compute"
ATTENTION = "attention"
GRAPH_ATTENTION = "attention layer (graph)"  # a decode attention layer replayed whole (layer_graph.py)
CPU_ATTENTION = "cpu attention"
DEQUANTIZE = "dequantize"
WAIT = "waiting on I/O"
WEIGHT_LOAD = {"disk": "weight load (disk)", "cpu": "weight load (cpu)", "gpu": "weight load (gpu)"}
CACHE_LOAD = {"disk": "cache load (disk)", "cpu": "cache load (cpu)", "gpu": "cache load (gpu)"}
CACHE_STORE = {"disk": "cache store (disk)", "cpu": "cache store (cpu)", "gpu": "cache store (gpu)"}
ACT_LOAD = {"disk": "activation load (disk)", "cpu": "activation load (cpu)"}
ACT_STORE = {"disk": "activation store (disk)", "cpu": "activation store (cpu)"}

COMPUTE_LANE = "compute"


class Span:
    """One stage on one lane, seconds on the perf_counter clock; `nbytes` moved (or, for compute, not set).
    Used as a context manager it times the enclosed work and then appends itself to `sink` (a plain class
    rather than a generator context: a span costs about a microsecond)."""

    __slots__ = ("stage", "lane", "start", "end", "nbytes", "sink")

    def __init__(self, stage: str, lane: str, start: float = 0.0, end: float = 0.0, nbytes: int = 0,
                 sink: list | None = None) -> None:
        self.stage, self.lane, self.start, self.end, self.nbytes, self.sink = stage, lane, start, end, nbytes, sink

    def __enter__(self) -> Span:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.end = time.perf_counter()
        self.sink.append(self)  # list.append is atomic under the GIL: I/O threads append too

    def __repr__(self) -> str:
        return f"Span({self.stage!r}, {self.lane!r}, {self.start:.6f}, {self.end:.6f}, {self.nbytes})"


@dataclass
class StepMark:
    """A step's window and what it computed: `rows` active sequences, `tokens` new positions per row,
    `context` cached positions before them (cli/breakdown.py turns these into FLOPs)."""

    index: int
    start: float
    end: float = 0.0
    rows: int = 0
    tokens: int = 0
    context: int = 0
    attention: str = ""  # the attention kernels that ran in the step ("flash", "efficient+flash", ...)

    @property
    def phase(self) -> str:
        return "prefill" if self.index == 0 else "decode"


class _NoSpan:
    """What a disabled recorder's span yields: attributes may be set on it and are dropped."""

    nbytes = 0

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __setattr__(self, name, value) -> None:
        pass


class NullRecorder:
    """Records nothing (the default): instrumented code costs one call per span."""

    enabled = False
    _span = _NoSpan()

    def span(self, stage: str, nbytes: int = 0, stream: str | None = None) -> _NoSpan:
        return self._span

    def step(self, index: int, rows: int = 0, tokens: int = 0, context: int = 0):
        return contextlib.nullcontext()

    def resolve(self) -> None:
        pass


NULL = NullRecorder()


class Recorder:
    """Spans measured with perf_counter on the calling thread's lane (a CPU compute device)."""

    enabled = True

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.steps: list[StepMark] = []
        self.origin = time.perf_counter()
        self._lanes: dict[int, str] = {}
        self._lock = threading.Lock()

    schedule_lane = COMPUTE_LANE  # host spans of the thread that runs the schedule

    def lane(self) -> str:
        """The calling thread's lane: `schedule_lane` for the thread running steps, "io-N" for the Nth
        other (I/O worker) thread seen."""
        ident = threading.get_ident()
        name = self._lanes.get(ident)
        if name is None:
            with self._lock:
                name = self._lanes[ident] = f"io-{sum(n.startswith('io-') for n in self._lanes.values())}"
        return name

    def span(self, stage: str, nbytes: int = 0, stream: str | None = None) -> Span:
        """A context timing the enclosed work as `stage`; the Span it yields may have nbytes set inside."""
        return Span(stage, self.lane(), nbytes=nbytes, sink=self.spans)

    @contextlib.contextmanager
    def step(self, index: int, rows: int = 0, tokens: int = 0, context: int = 0):
        """One step of the schedule: its window, and its own time outside every stage (STEP). Yields the step's
        StepMark (the engine notes what ran on it)."""
        self._lanes.setdefault(threading.get_ident(), self.schedule_lane)
        mark = StepMark(index, 0.0, rows=rows, tokens=tokens, context=context)
        with self.span(STEP) as s:
            mark.start = s.start
            yield mark
        mark.end = s.end = time.perf_counter()
        self.steps.append(mark)

    def resolve(self) -> None:
        """Make the step's spans final (CUDA: read its events); nothing to do on a CPU."""


class CudaRecorder(Recorder):
    """Spans with a `stream` lane are timing events on the current CUDA stream, resolved after each step
    against an event recorded where the step began (no synchronization inside a step)."""

    schedule_lane = "host"  # the schedule thread's host work (CPU attention); its GPU work is on "compute"

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self._pending: list[_EventSpan] = []
        self._anchor: tuple[torch.cuda.Event, float] | None = None

    def span(self, stage: str, nbytes: int = 0, stream: str | None = None) -> Span:
        if stream is None:
            return super().span(stage, nbytes)
        return _EventSpan(stage, stream, nbytes=nbytes, sink=self._pending)

    @contextlib.contextmanager
    def step(self, index: int, rows: int = 0, tokens: int = 0, context: int = 0):
        self._lanes.setdefault(threading.get_ident(), self.schedule_lane)
        anchor = torch.cuda.Event(enable_timing=True)
        anchor.record(torch.cuda.current_stream(self.device))
        self._anchor = (anchor, time.perf_counter())  # the previous step ended synchronized: the GPU is idle
        mark = StepMark(index, self._anchor[1], rows=rows, tokens=tokens, context=context)
        with self.span(STEP, stream=COMPUTE_LANE):
            yield mark
        self.steps.append(mark)

    def resolve(self) -> None:
        """After the engine's synchronize: event times as perf_counter seconds; the step's window is its
        STEP span on the compute stream."""
        if self._anchor is None:
            return
        anchor, host = self._anchor
        # spans of background copies still running stay for the next step; I/O threads append meanwhile
        done = [s for s in list(self._pending) if s.finish.query()]
        for s in done:
            self._pending.remove(s)
            s.start = host + anchor.elapsed_time(s.begin) / 1e3
            s.end = host + anchor.elapsed_time(s.finish) / 1e3
            s.begin = s.finish = None
            self.spans.append(s)
            if s.stage == STEP and s.lane == COMPUTE_LANE and self.steps:
                self.steps[-1].start, self.steps[-1].end = s.start, s.end


class _EventSpan(Span):
    """A span timed by two CUDA events on the stream current where it is entered and left."""

    __slots__ = ("begin", "finish")

    def __enter__(self) -> _EventSpan:
        self.begin = torch.cuda.Event(enable_timing=True)
        self.begin.record()
        return self

    def __exit__(self, *exc) -> None:
        self.finish = torch.cuda.Event(enable_timing=True)
        self.finish.record()
        self.sink.append(self)


def make_recorder(device: torch.device) -> Recorder:
    """The recorder for a compute device: events on CUDA, perf_counter elsewhere."""
    return CudaRecorder(device) if device.type == "cuda" else Recorder()
