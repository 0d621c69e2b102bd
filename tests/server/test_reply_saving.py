"""A streaming reply keeps every token in order when its reader leaves while a save is in flight."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tertulia.providers.base import Reply, ReplyEvent, Usage
from tertulia.server import replies_api
from tertulia.store.conversations import Store
from tertulia.store.database import open_store


class Words(Reply):
    """A reply that yields one word at a time, forever (until cancelled)."""

    def __init__(self) -> None:
        self.usage = Usage()
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    async def events(self) -> AsyncIterator[ReplyEvent]:
        number = 0
        while not self.cancelled:
            number += 1
            self.usage.produced(1)
            yield ReplyEvent(text=f"w{number} ")
            await asyncio.sleep(0.01)


class SlowStore(Store):
    """Each save takes a while, so that the reader can leave while one is being written."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.saving = threading.Event()

    def append(self, message_id: str, text: str) -> None:
        self.saving.set()
        time.sleep(0.3)
        super().append(message_id, text)


@pytest.mark.parametrize("saves_busy", [False, True])
def test_leaving_mid_save_loses_nothing(tmp_path: Path, monkeypatch, saves_busy: bool) -> None:
    store = SlowStore(open_store(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    user = store.local_user().id
    conversation = store.create_conversation(user)
    answer = store.add_message(user, conversation.id, "assistant", "", status="streaming")
    monkeypatch.setattr(replies_api, "SAVE_EVERY_SECONDS", 0.05)
    if saves_busy:  # the save waits in the queue behind others: it is taken back and written last
        monkeypatch.setattr(replies_api, "_SAVES", replies_api.ThreadPoolExecutor(max_workers=1))
        for _ in range(2):
            replies_api._SAVES.submit(time.sleep, 0.2)

    async def read_then_leave() -> str:
        shown: list[str] = []
        events = replies_api._events(store, Words(), answer.id, {"type": "start"})

        async def read() -> None:
            async for chunk in events:
                if '"delta"' in chunk:
                    shown.append(chunk.split('"text": "')[1].split('"')[0])

        reader = asyncio.create_task(read())
        # Busy: the first save waits behind the others, not started; else one is being written.
        while len(shown) < 10 if saves_busy else not store.saving.is_set():
            await asyncio.sleep(0.005)
        reader.cancel()  # the tab closes while a save is being written (or waits its turn)
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await events.aclose()
        return "".join(shown)

    shown = asyncio.run(read_then_leave())
    (turn,) = [t for t in store.path(user, conversation.id) if t.message.id == answer.id]
    assert turn.message.status == "incomplete"
    assert turn.message.content == shown  # every word the reader saw, in order, none twice
    assert shown.startswith("w1 w2 ") and len(shown.split()) >= 3
