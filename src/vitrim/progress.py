"""Progress bars (tqdm) that stay quiet when disabled or when stderr is not a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], *, total: int | None = None, desc: str = "",
                 enabled: bool = True, **kwargs: Any) -> tqdm:
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 30.0, **kwargs)
