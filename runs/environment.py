"""Environment variables set for a block of code and put back afterwards, as they were (unset if they were)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping


@contextmanager
def environment(values: Mapping[str, str], restore: Iterable[str] = ()) -> Iterator[None]:
    """os.environ with `values` set inside the block; after it, those variables and the ones named in `restore`
    (set by something the block runs) are as they were before."""
    before = {k: os.environ.get(k) for k in (*values, *restore)}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
