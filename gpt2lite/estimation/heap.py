"""What the CPU's resident set makes of a step's allocations: a model of glibc's malloc, which torch's CPU
allocator calls.

The resident set is not the live tensor bytes. glibc serves a request of at least its mmap threshold with
mmap (returned to the system on free) and a smaller one from its heap, whose freed chunks stay resident
until they are reused, unless they lie at the heap's top. The threshold starts at 128 KiB and rises to the
size of each mmapped chunk freed (up to 32 MiB), so after the first step most activations of a GPT-2
block come from the heap, and the holes they leave are what a second step's peak adds. `resident_peak`
replays the traced allocations through that model: best-fit in the heap's holes (coalesced on free), the
top trimmed when its free end exceeds the trim threshold (twice the mmap threshold).
"""

from __future__ import annotations

import bisect
from typing import Iterable, List, Tuple

PAGE = 4096
MMAP_THRESHOLD = 128 * 1024
MMAP_THRESHOLD_MAX = 32 * 2**20
ALIGN = 64  # torch's CPU allocator aligns to 64 bytes


class Heap:
    """glibc's main arena, by sizes: mmapped chunks, the heap's extent, its free holes (address, size)."""

    def __init__(self):
        self.threshold, self.trim_threshold = MMAP_THRESHOLD, 2 * MMAP_THRESHOLD
        self.mapped = 0  # bytes of live mmapped chunks
        self.top = 0  # the heap's extent: resident whether its chunks are used or free
        self.holes: List[Tuple[int, int]] = []  # (address, size), sorted by address
        self.chunks = {}  # id -> (address, size) in the heap, or (None, size) when mmapped
        self.peak = 0

    def resident(self) -> int:
        return self.mapped + self.top

    def malloc(self, chunk_id, nbytes: int):
        size = -(-max(nbytes, 1) // ALIGN) * ALIGN + 16
        if size >= self.threshold:
            size = -(-size // PAGE) * PAGE
            self.mapped += size
            self.chunks[chunk_id] = (None, size)
        else:
            self.chunks[chunk_id] = (self.take(size), size)
        self.peak = max(self.peak, self.resident())

    def take(self, size: int) -> int:
        """The address of `size` bytes: the smallest hole that holds them, else the top of the heap."""
        best = None
        for index, (address, hole) in enumerate(self.holes):
            if hole >= size and (best is None or hole < self.holes[best][1]):
                best = index
        if best is None:
            if self.holes and sum(self.holes[-1]) == self.top:  # a free end of the heap grows into the top
                address, _ = self.holes.pop()
            else:
                address = self.top
            self.top = address + size
            return address
        address, hole = self.holes.pop(best)
        if hole > size:
            bisect.insort(self.holes, (address + size, hole - size))
        return address

    def free(self, chunk_id):
        address, size = self.chunks.pop(chunk_id)
        if address is None:
            self.mapped -= size
            if self.threshold < size <= MMAP_THRESHOLD_MAX:
                self.threshold, self.trim_threshold = size, 2 * size
            return
        index = bisect.bisect(self.holes, (address, size))
        if index < len(self.holes) and self.holes[index][0] == address + size:  # merge with the next hole
            size += self.holes.pop(index)[1]
        if index > 0 and sum(self.holes[index - 1]) == address:  # and with the previous one
            address, previous = self.holes.pop(index - 1)
            size += previous
            index -= 1
        if address + size == self.top and size > self.trim_threshold:
            self.top = address  # trimmed: given back to the system
            return
        self.holes.insert(index, (address, size))


def resident_peak(events: Iterable[Tuple[str, object, int]]) -> int:
    """The peak resident bytes of a sequence of ("malloc", id, nbytes) and ("free", id, 0) events."""
    heap = Heap()
    for kind, chunk_id, nbytes in events:
        if kind == "malloc":
            heap.malloc(chunk_id, nbytes)
        elif chunk_id in heap.chunks:
            heap.free(chunk_id)
    return heap.peak


def step_events(trace) -> List[Tuple[str, object, int]]:
    """The allocations of a run as a StepTrace saw them: the model's weights, then its traced step twice (the
    second step frees the first's gradients first and keeps its optimizer state)."""
    end = trace.operations  # what the trace's end freed (the fake model itself) is alive in the run
    weights = [r for r in trace.storages if r.made <= trace.built < r.freed]
    events = [("malloc", ("weights", id(r)), r.nbytes) for r in weights]
    step = [r for r in trace.storages if trace.built < r.made <= end]
    timeline = sorted([(r.made, 1, r) for r in step] + [(r.freed, 0, r) for r in step if r.freed <= end],
                      key=lambda event: (event[0], event[1]))
    for repeat in (1, 2):
        if repeat == 2:
            events += [("free", (1, id(r)), 0) for r in step if id(r) in trace.repeated]
        for _, is_malloc, r in timeline:
            if repeat == 2 and id(r) in trace.kept:
                continue
            events.append(("malloc" if is_malloc else "free", (repeat, id(r)), r.nbytes))
    return events
