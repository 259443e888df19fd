"""Deterministic, class-stratified ordering of candidate files.

The order is a pure function of the file list and the seed (Python's
``random.Random``, stable across numpy releases), so the same folder and seed
always calibrate on the same images. Classes take turns (round robin in
sorted order), so a sample of N covers every class as evenly as the folder
allows, and a bad file is replaced by the next file of its own class.
"""

from __future__ import annotations

import random
from typing import Iterator, Mapping, Sequence, TypeVar

T = TypeVar("T")


def stratified_order(groups: Mapping[str | None, Sequence[T]], seed: int) -> Iterator[T]:
    """Yield every item once: shuffled within its class, classes interleaved."""
    queues = []
    for key in sorted(groups, key=lambda k: (k is None, str(k))):
        items = list(groups[key])
        random.Random(f"{seed}:{key}").shuffle(items)
        queues.append(items)
    position = 0
    while queues:
        alive = []
        for queue in queues:
            if position < len(queue):
                yield queue[position]
                alive.append(queue)
        queues = [q for q in alive if position + 1 < len(q)]
        position += 1
