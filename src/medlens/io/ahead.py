"""Work one step ahead in a background thread: decode the next batch (or file) while the
model runs on this one. PIL, pydicom and numpy release the GIL while they decode and
torch while it computes, so on a CPU the two overlap; threads rather than processes
because decoded pixels then need no copy between processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def ahead(items: Sequence[T], fn: Callable[[T], Any] | None) -> Iterator[tuple[T, Any]]:
    """Each item with ``fn(item)`` (None without ``fn``), computing the next item's in a
    background thread while the caller works on this one. An exception from ``fn``
    surfaces at the item it belongs to, after the items before it were yielded."""
    if fn is None or len(items) < 2:
        for item in items:
            yield item, fn(item) if fn is not None else None
        return
    with ThreadPoolExecutor(1, thread_name_prefix="medlens-prepare") as pool:
        pending = pool.submit(fn, items[0])
        for k, item in enumerate(items):
            ready = pending.result()
            if k + 1 < len(items):
                pending = pool.submit(fn, items[k + 1])
            yield item, ready
