"""Running a computation on one thread and on several, for the kernels' thread-invariance tests."""

from __future__ import annotations

from collections.abc import Callable

import torch


def one_and_many_threads(compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute()` with torch limited to one thread, then with at least two."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = compute()
        torch.set_num_threads(max(2, threads))
        shared = compute()
    finally:
        torch.set_num_threads(threads)
    return alone, shared
