"""Two clocks, one scheduler: the same event-driven code runs on a virtual clock (simulator, tests) and a real one.

Both offer ``now()``, ``call_at(t, fn, *args)``, ``call_later(dt, ...)`` and ``call_soon_threadsafe(fn, ...)``, and
run callbacks one at a time, in time order (ties in the order they were scheduled), so the scheduler's state is only
ever touched by one callback at a time.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import threading
import time
from collections import deque

log = logging.getLogger("jitkernels.scheduler")


def _time(when) -> float:
    """An event time: a NaN (which no comparison orders) stopped the clock's heap and its waits."""
    when = float(when)
    if when != when:
        raise ValueError("an event time must be a number, got NaN")
    return when


class Handle:
    __slots__ = ("when", "fn", "args", "cancelled", "heap")
    pops_itself = False  # a stream's handle, whose call takes its own heap entry (see _Stream)

    def __init__(self, when, fn, args, heap=None):
        self.when, self.fn, self.args, self.cancelled, self.heap = when, fn, args, False, heap

    def cancel(self) -> None:
        """Never called; what it would have been called with is let go now (a round's deadline, cancelled when the
        round ended, held the round and its result model until the deadline's time came: a job kept every round
        of the last deadline_s in memory, not its last keep_rounds)."""
        if not self.cancelled:
            self.cancelled = True
            self.fn, self.args = None, ()
            if self.heap is not None:
                self.heap.cancelled += 1  # (from any thread: a count that may run ahead only compacts sooner)


class _Heap:
    def __init__(self):
        self._heap = []
        self._seq = itertools.count()
        self.cancelled = 0  # about how many cancelled handles it holds

    def push(self, when, fn, args) -> Handle:
        h = Handle(when, fn, args, self)
        heapq.heappush(self._heap, (when, next(self._seq), h))
        if self.cancelled > 64 and 2 * self.cancelled > len(self._heap):
            # mostly cancelled (deadlines of rounds that ended long before them): drop them, as asyncio does
            self._heap[:] = [e for e in self._heap if not e[2].cancelled]  # (in place: VirtualClock.run holds it)
            heapq.heapify(self._heap)
            self.cancelled = 0
        return h

    def peek_time(self):
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def pop(self) -> Handle:
        return heapq.heappop(self._heap)[2]

    def __len__(self):
        return len(self._heap)


class _StreamHandle(Handle):
    __slots__ = ()
    pops_itself = True


class _Stream:
    """Calls in time order that hold one heap entry between them: the next is pushed, with the sequence number
    reserved for it, as the one before it runs (it cannot be due before that one: its (time, sequence) is later)."""

    __slots__ = ("heap", "times", "fn", "args", "seq", "i", "handle")

    def __init__(self, heap: _Heap, times, fn, args):
        self.heap, self.times, self.fn, self.args, self.i = heap, times, fn, args, 0
        self.seq = next(heap._seq)
        deque(itertools.islice(heap._seq, len(times) - 1), maxlen=0)  # (reserved: seq .. seq + len - 1)
        self.handle = _StreamHandle(times[0], self._fire, ())

    def start(self) -> None:
        heapq.heappush(self.heap._heap, (self.times[0], self.seq, self.handle))

    def _fire(self) -> None:
        """Called with its entry still at the top of the heap (``pops_itself``): the next call replaces it there, one
        sift where a pop and a push took two (a simulation's arrivals are most of its heap's traffic)."""
        i = self.i
        self.i = i + 1
        fn, args = self.fn, self.args[i]
        if i + 1 < len(self.times):
            self.handle.when = self.times[i + 1]
            heapq.heapreplace(self.heap._heap, (self.times[i + 1], self.seq + i + 1, self.handle))
        else:  # the last: let go of it all (stream -> handle -> bound method -> stream is a cycle, which a simulation,
            # run with the cyclic collector off, kept for its whole run: ~0.2 MB a round, 1 GB over 6,250 rounds)
            heapq.heappop(self.heap._heap)
            self.handle.fn = None
            self.handle = self.fn = self.args = self.times = None
        fn(*args)


class VirtualClock:
    """Discrete-event time: ``run()`` jumps from event to event. Nothing sleeps.

    Events for the current time (``call_soon``, half of a simulation's events: each arrival hands its update on)
    skip the heap: they go to a FIFO that shares the heap's sequence numbers, and ``run`` takes whichever of the two
    heads comes first in (time, sequence) order, so the order is the heap-only order."""

    def __init__(self, start: float = 0.0):
        self._now = float(start)
        self._q = _Heap()
        self._soon = deque()  # (seq, Handle) due at self._now
        self.events = 0

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        """Time that outlives a restart (the state directory records when rounds open): the virtual time itself,
        for a scheduler resumed on the same clock."""
        return self._now

    def call_at(self, when: float, fn, *args) -> Handle:
        when = _time(when)
        if when <= self._now:
            h = Handle(self._now, fn, args)
            self._soon.append((next(self._q._seq), h))
            return h
        return self._q.push(when, fn, args)

    def call_later(self, delay: float, fn, *args) -> Handle:
        return self.call_at(self._now + max(delay, 0.0), fn, *args)

    def call_soon_threadsafe(self, fn, *args) -> Handle:
        return self.call_at(self._now, fn, *args)

    call_soon = call_soon_threadsafe

    def call_at_each(self, times, fn, args) -> None:
        """``fn(*args[i])`` at ``times[i]`` for every i (``times`` ascending): the order of as many ``call_at`` calls
        made now (their sequence numbers are taken now), with one heap entry at a time instead of all of them. A
        simulated round schedules each of its thousands of arrivals at its start; held in the heap together they made
        every event of the run pay for their depth."""
        times = [_time(t) for t in times]
        if len(args) != len(times):
            raise ValueError(f"{len(times)} times for {len(args)} calls")
        if any(b < a for a, b in zip(times, times[1:])):
            raise ValueError("call_at_each takes its times in ascending order")
        now = bisect.bisect_right(times, self._now)  # (due now: the FIFO, as call_at puts them)
        for t, a in zip(times[:now], args[:now]):
            self.call_at(t, fn, *a)
        if now < len(times):
            _Stream(self._q, times[now:], fn, args[now:]).start()

    def run(self, until: float | None = None) -> None:
        """Process events in time order until none is left (or the next is after ``until``)."""
        soon, heap = self._soon, self._q._heap
        while True:
            if soon:  # due now; a heap event due now that was scheduled earlier goes first
                if heap and heap[0][0] <= self._now and heap[0][1] < soon[0][0]:
                    h = heap[0][2]
                    if not h.pops_itself:
                        heapq.heappop(heap)
                else:
                    h = soon.popleft()[1]
            else:
                t = self._q.peek_time()
                if t is None or (until is not None and t > until):
                    break
                h = heap[0][2]
                if not h.pops_itself:
                    heapq.heappop(heap)
                self._now = h.when
            fn = h.fn
            if fn is None:  # cancelled (from another thread too, since it was peeked): its callback is let go
                continue
            self.events += 1
            fn(*h.args)
        if until is not None:
            self._now = max(self._now, until)


class RealClock:
    """Wall time (monotonic, seconds since the clock started), with one thread running the callbacks."""

    def __init__(self):
        self._t0 = time.monotonic()
        self._q = _Heap()
        self._cv = threading.Condition()
        self._stop = False
        self.events = 0
        self._thread = threading.Thread(target=self._loop, name="jitkernels-scheduler", daemon=True)
        self._thread.start()

    def now(self) -> float:
        return time.monotonic() - self._t0

    def wall(self) -> float:
        """Time that outlives a restart (the state directory records when rounds open): the Unix time."""
        return time.time()

    def call_at(self, when: float, fn, *args) -> Handle:
        when = _time(when)
        with self._cv:
            h = self._q.push(when, fn, args)
            self._cv.notify()
        return h

    def call_later(self, delay: float, fn, *args) -> Handle:
        return self.call_at(self.now() + max(delay, 0.0), fn, *args)

    def call_soon_threadsafe(self, fn, *args) -> Handle:
        return self.call_at(self.now(), fn, *args)

    call_soon = call_soon_threadsafe

    def _loop(self):
        while True:
            with self._cv:
                while True:
                    if self._stop:
                        return
                    t = self._q.peek_time()
                    wait = None if t is None else t - self.now()
                    if wait is not None and wait <= 0:
                        h = self._q.pop()
                        fn, args = h.fn, h.args  # (read here: a cancel() from another thread lets them go)
                        if h.cancelled:  # cancelled since it was peeked, or between the two reads (cancel() sets
                            continue  # the flag first)
                        break
                    # (at most an hour at a time: a deadline of 1e10 s, past threading.TIMEOUT_MAX, raised
                    # OverflowError here and the clock thread died, every job with it)
                    self._cv.wait(timeout=None if wait is None else min(wait, 3600.0))
            self.events += 1
            try:
                fn(*args)
            except Exception:  # one failed callback must not stop every job's clock
                log.exception("scheduler callback %r failed", getattr(fn, "__qualname__", fn))

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()
