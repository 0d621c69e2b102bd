"""`tertulia data export`: liked replies in the store become fine-tuning examples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tertulia.store.conversations import Store
from tertulia.store.database import open_store
from tertulia.train.export import examples


def fill(store: Store) -> dict[str, str]:
    """Two conversations: one with a persona and a liked reply, one with a disliked and an unfinished one."""
    user = store.local_user().id
    persona = store.create_persona(user, "Luna", "You are Luna.")
    first = store.create_conversation(user, persona_id=persona.id, system_prompt="Be brief.")
    q1 = store.add_message(user, first.id, "user", "Who are you?")
    a1 = store.add_message(user, first.id, "assistant", "I am Luna.", parent_id=q1.id)
    q2 = store.add_message(user, first.id, "user", "And your creator?", parent_id=a1.id)
    a2 = store.add_message(user, first.id, "assistant", "The Tertulia team.", parent_id=q2.id)
    store.rate(user, a1.id, 1)
    second = store.create_conversation(user)
    q3 = store.add_message(user, second.id, "user", "Tell me a joke.")
    bad = store.add_message(user, second.id, "assistant", "No.", parent_id=q3.id)
    store.rate(user, bad.id, -1)
    cut = store.add_message(user, second.id, "assistant", "Why did", parent_id=q3.id, status="streaming")
    store.rate(user, cut.id, 1)  # liked, but cut short: not exported
    return {"user": user, "first": first.id, "second": second.id, "a2": a2.id}


def test_liked_replies_and_shown_branches(tmp_path: Path) -> None:
    store = Store(open_store(f"sqlite:///{tmp_path / 'chats.db'}"))
    ids = fill(store)
    liked = list(examples(store, ids["user"]))
    assert liked == [
        {
            "messages": [
                {"role": "system", "content": "You are Luna.\n\nBe brief."},
                {"role": "user", "content": "Who are you?"},
                {"role": "assistant", "content": "I am Luna."},
            ]
        }
    ]
    shown = list(examples(store, ids["user"], shown=True))
    # The first conversation whole; the second's shown reply is the unfinished one: left out.
    assert [len(e["messages"]) for e in shown] == [5]
    assert shown[0]["messages"][-1] == {"role": "assistant", "content": "The Tertulia team."}


def test_the_cli_writes_jsonl_that_validates(tmp_path: Path, embedded_dir) -> None:
    url = f"sqlite:///{tmp_path / 'chats.db'}"
    fill(Store(open_store(url)))
    out = tmp_path / "liked.jsonl"

    def data(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "tertulia", "data", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    made = data("export", str(out), "--database-url", url)
    assert made.returncode == 0, made.stderr
    assert "1 example(s) from replies rated thumbs-up" in made.stdout
    assert [json.loads(line)["messages"][-1]["content"] for line in out.read_text().splitlines()] == [
        "I am Luna."
    ]
    checked = data("validate", str(out))
    assert "0 error(s)" in checked.stdout
    again = data("export", str(out), "--database-url", url)
    assert again.returncode == 1 and "--force" in again.stderr
    nobody = data("export", str(tmp_path / "x.jsonl"), "--database-url", url, "--user", "ghost")
    assert nobody.returncode == 1 and "No user named 'ghost'" in nobody.stderr
