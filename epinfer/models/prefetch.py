"""A checkpoint's bytes read into the page cache ahead of the loader, on background threads.

The loader reads one tensor at a time through safetensors' memory maps: one thread's page faults,
so a cold disk serves one stream of reads at a time. `Prefetcher` reads the byte ranges of the next
few load units (decoder layers) with several threads (`os.preadv` into a buffer per thread, 16 MiB
pieces), so that the loader's page faults find the pages cached. It is best effort: a range that
cannot be read is skipped, and the loader's own read of it reports the error.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

PIECE = 16 << 20  # bytes a read


def tensor_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's [begin, end) byte offsets in a safetensors file (header: 8-byte length, JSON);
    {} for a file that does not parse (the loader reports it)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        base = 8 + n
        return {k: (base + int(v["data_offsets"][0]), base + int(v["data_offsets"][1]))
                for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, TypeError, KeyError, IndexError, OverflowError):
        return {}


def merged(spans: list[tuple[Path, int, int]]) -> list[tuple[Path, int, int]]:
    """Ranges of one file that touch or overlap joined, in file order (a layer's tensors are
    mostly adjacent in a shard)."""
    out: list[tuple[Path, int, int]] = []
    for path, begin, end in sorted(spans, key=lambda s: (str(s[0]), s[1])):
        if out and out[-1][0] == path and begin <= out[-1][2]:
            out[-1] = (path, out[-1][1], max(out[-1][2], end))
        else:
            out.append((path, begin, end))
    return out


class Prefetcher:
    """`units[i]`: the (file, begin, end) ranges load unit i reads. `advance(i)` before loading unit
    i queues the reads of units i .. i + `lead` not queued yet; `close()` drops the queued reads
    and waits for those running."""

    def __init__(self, units: list[list[tuple[Path, int, int]]], threads: int = 8, lead: int = 2) -> None:
        self.units = [merged(u) for u in units]
        self.lead = lead
        self.queued = 0
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="epinfer-prefetch")
        self.local = threading.local()
        self.futures: list[Future] = []

    def advance(self, i: int) -> None:
        while self.queued < min(i + self.lead + 1, len(self.units)):
            for path, begin, end in self.units[self.queued]:
                for offset in range(begin, end, PIECE):
                    self.futures.append(self.pool.submit(self._read, path, offset, min(PIECE, end - offset)))
            self.queued += 1
        self.futures = [f for f in self.futures if not f.done()]

    def _read(self, path: Path, offset: int, size: int) -> None:
        buf = getattr(self.local, "buf", None)
        if buf is None or len(buf) < size:  # (a small checkpoint's reads take small buffers)
            buf = self.local.buf = bytearray(size)
        try:  # (non-blocking, regular files only: a shard swapped for a FIFO must not hang a reader)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    os.preadv(fd, [memoryview(buf)[:size]], offset)
            finally:
                os.close(fd)
        except OSError:
            pass

    def close(self) -> None:
        for f in self.futures:
            f.cancel()
        self.pool.shutdown(wait=True)
