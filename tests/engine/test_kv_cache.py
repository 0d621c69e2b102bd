"""The KV pool: memory committed only where written, in small pages."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tertulia.engine.kv_cache import KVCache
from tests.conftest import tiny_config


def mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds `address`."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_the_pool_is_lazy_and_never_in_huge_pages() -> None:
    """A 2 MB page per layer and head would make a first write zero hundreds of megabytes."""
    cache = KVCache(tiny_config(num_hidden_layers=4), num_blocks=4096)
    cache.keys[0][:, :16] = 1.0
    cache.values[3][:, :16] = 2.0
    middle = cache.storage.data_ptr() + cache.storage.numel() * cache.storage.element_size() // 2
    fields = mapping_of(middle)
    assert fields["THPeligible"] == "0"
    assert fields["AnonHugePages"] == "0 kB"
    resident_kb = int(fields["Rss"].split()[0])
    assert resident_kb < cache.storage.numel() * 4 // 1024 // 10  # written pages only
    assert float(cache.keys[0][:, :16].sum()) == cache.keys[0][:, :16].numel()
    assert float(cache.values[1].abs().sum()) == 0.0
