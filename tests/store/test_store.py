"""The store on SQLite and PostgreSQL: migrations, the message tree, streaming saves, isolation."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select, text

from tertulia.errors import TertuliaError
from tertulia.store.conversations import NotFound, Store, title_from
from tertulia.store.database import Database
from tertulia.store.schema import Base, Feedback, Message

# --- migrations and settings -----------------------------------------------------------------------


def test_migrations_build_exactly_the_schema_of_the_models(database: Database) -> None:
    assert database.revision() == database.head() == "0003"
    with database.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []
    assert database.migrate() is None  # already at head: nothing to do, no backup


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'a.db'}")
    with database.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_the_sqlite_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    loose = tmp_path / "loose.db"
    loose.touch(mode=0o644)
    for path in (tmp_path / "new.db", loose):
        database = Database(f"sqlite:///{path}")
        database.migrate()
        with database.engine.connect() as connection:  # WAL files exist while a connection is open
            connection.execute(text("SELECT 1"))
            files = [p for p in tmp_path.iterdir() if p.name.startswith(path.name)]
            assert len(files) >= 2 and all(p.stat().st_mode & 0o077 == 0 for p in files), files
        database.close()


def test_an_sqlite_file_is_backed_up_before_it_is_migrated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = Database(f"sqlite:///{tmp_path / 'chats.db'}")
    assert database.migrate() is None  # a new file: nothing to back up
    store = Store(database)
    user = store.local_user()
    conversation = store.create_conversation(user.id)
    store.add_message(user.id, conversation.id, "user", "keep me")
    monkeypatch.setattr(Database, "head", lambda self: "0004")  # as if a newer release shipped
    backup = database.migrate()
    assert backup is not None and backup.name.startswith("chats.db.0003.")
    with sqlite3.connect(backup) as copy:
        assert copy.execute("SELECT content FROM messages").fetchall() == [("keep me",)]


@pytest.mark.parametrize(
    "url", ["not a url", "mysql://u@h/db", "postgresql://nobody@127.0.0.1:1/none"], ids=str
)
def test_bad_database_urls_are_clear_errors(url: str) -> None:
    with pytest.raises(TertuliaError) as error:
        Database(url).migrate()
    assert "database" in str(error.value).lower()


# --- conversations -----------------------------------------------------------------------------------


def test_titles_order_and_search(store: Store) -> None:
    user = store.local_user().id
    first = store.create_conversation(user)
    store.add_message(user, first.id, "user", "How do I bake   bread\nat home?")
    second = store.create_conversation(user)
    store.add_message(user, second.id, "user", "Plan a 100% vegan menu " + "with many courses " * 5)
    assert store.conversation(user, first.id).title == "How do I bake bread at home?"
    long_title = store.conversation(user, second.id).title
    assert long_title.endswith("…") and len(long_title) <= 61
    assert [c.id for c in store.conversations(user)] == [second.id, first.id]  # newest first
    store.add_message(user, first.id, "assistant", "Knead the DOUGH well.", parent_id=None)
    assert [c.id for c in store.conversations(user)] == [first.id, second.id]  # touched: now newest
    assert [c.id for c in store.conversations(user, search="dough")] == [first.id]
    assert [c.id for c in store.conversations(user, search="100%")] == [second.id]  # % is literal
    assert store.conversations(user, search="_") == []
    store.update_conversation(user, first.id, title="Bread")
    assert [c.title for c in store.conversations(user, search="bread")] == ["Bread"]
    assert title_from("   ") == "New chat"


def test_edits_and_regenerations_are_branches(store: Store) -> None:
    user = store.local_user().id
    conversation = store.create_conversation(user).id
    question = store.add_message(user, conversation, "user", "Capital of France?")
    first_reply = store.add_message(user, conversation, "assistant", "Paris.", parent_id=question.id)
    follow_up = store.add_message(user, conversation, "user", "And Spain?", parent_id=first_reply.id)
    store.add_message(user, conversation, "assistant", "Madrid.", parent_id=follow_up.id)
    regenerated = store.add_message(user, conversation, "assistant", "It is Paris.", parent_id=question.id)
    path = store.path(user, conversation)
    assert [t.message.content for t in path] == ["Capital of France?", "It is Paris."]
    assert [(t.index, t.count) for t in path] == [(0, 1), (1, 2)]
    assert path[1].sibling_ids == [first_reply.id, regenerated.id]
    # Back to the first reply: the branch is followed down to its newest leaf.
    back = store.show_branch(user, conversation, first_reply.id)
    assert [t.message.content for t in back] == ["Capital of France?", "Paris.", "And Spain?", "Madrid."]
    # Editing the first question is a new root: the old conversation stays reachable.
    edited = store.add_message(user, conversation, "user", "Capital of Italy?")
    assert [(t.message.content, t.index, t.count) for t in store.path(user, conversation)] == [
        ("Capital of Italy?", 1, 2)
    ]
    assert store.path(user, conversation, leaf_id=first_reply.id)[0].sibling_ids == [question.id, edited.id]
    with pytest.raises(NotFound):
        store.add_message(user, conversation, "user", "x", parent_id="0" * 32)
    with pytest.raises(TertuliaError, match="Unknown role"):
        store.add_message(user, conversation, "tool", "x")


def test_a_reply_is_saved_as_it_streams_and_closed_if_interrupted(store: Store) -> None:
    user = store.local_user().id
    conversation = store.create_conversation(user).id
    question = store.add_message(user, conversation, "user", "Tell me a story.")
    reply = store.add_message(user, conversation, "assistant", "", parent_id=question.id, status="streaming")
    for piece in ["Once", " upon", " a time"]:
        store.append(reply.id, piece)
    shown = store.path(user, conversation)[-1].message
    assert (shown.content, shown.status) == ("Once upon a time", "streaming")
    assert store.close_interrupted() == 1  # what the next start does after a crash
    shown = store.path(user, conversation)[-1].message
    assert (shown.content, shown.status) == ("Once upon a time", "incomplete")
    store.append(reply.id, " more")  # a late write after the reply ended changes nothing
    assert store.path(user, conversation)[-1].message.content == "Once upon a time"
    done = store.add_message(user, conversation, "assistant", "", parent_id=question.id, status="streaming")
    store.append(done.id, "The end.")
    store.finish(done.id, completion_tokens=3, tokens_per_second=70.5)
    final = store.path(user, conversation)[-1].message
    assert (final.status, final.completion_tokens, final.tokens_per_second) == ("complete", 3, 70.5)


def test_two_writers_on_one_reply_lose_nothing(store: Store) -> None:
    """Two tabs (threads) appending to the same reply: every piece lands, none overwrites another."""
    user = store.local_user().id
    conversation = store.create_conversation(user).id
    reply = store.add_message(user, conversation, "assistant", "", status="streaming")

    def write(letter: str) -> None:
        for _ in range(40):
            store.append(reply.id, letter)

    threads = [threading.Thread(target=write, args=(letter,)) for letter in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    content = store.path(user, conversation)[-1].message.content
    assert sorted(content) == ["a"] * 40 + ["b"] * 40


def test_feedback_and_delete(store: Store, database: Database) -> None:
    user = store.local_user().id
    conversation = store.create_conversation(user).id
    question = store.add_message(user, conversation, "user", "Hi")
    reply = store.add_message(user, conversation, "assistant", "Hello!", parent_id=question.id)
    store.rate(user, reply.id, 1)
    store.rate(user, reply.id, -1, "too short")
    assert store.ratings(user, conversation) == {reply.id: -1}
    store.rate(user, reply.id, 0)
    assert store.ratings(user, conversation) == {}
    store.rate(user, reply.id, 1)
    with pytest.raises(NotFound):
        store.rate(user, question.id, 1)  # only replies are rated
    with pytest.raises(TertuliaError):
        store.rate(user, reply.id, 5)
    store.delete_conversation(user, conversation)
    with database.session() as s:
        assert s.scalar(select(func.count()).select_from(Message)) == 0
        assert s.scalar(select(func.count()).select_from(Feedback)) == 0
    with pytest.raises(NotFound):
        store.conversation(user, conversation)


def test_personas_belong_to_their_user(store: Store) -> None:
    alice = store.create_user("alice", "hash").id
    bob = store.create_user("bob", "hash").id
    persona = store.create_persona(
        alice, "Lola", "You are Lola, from Sevilla.", settings={"temperature": 0.2}
    )
    assert [p.name for p in store.personas(alice)] == ["Lola"] and store.personas(bob) == []
    conversation = store.create_conversation(alice, persona_id=persona.id)
    assert store.conversation(alice, conversation.id).persona_id == persona.id
    with pytest.raises(NotFound):
        store.create_conversation(bob, persona_id=persona.id)
    with pytest.raises(NotFound):
        store.update_persona(bob, persona.id, name="Mine now")
    store.update_persona(alice, persona.id, name="Lola 2")
    assert store.persona(alice, persona.id).name == "Lola 2"
    store.delete_persona(alice, persona.id)
    assert store.conversation(alice, conversation.id).persona_id is None
    with pytest.raises(TertuliaError, match="already exists"):
        store.create_user("alice", None)


def test_one_user_never_reaches_another_users_conversation(store: Store) -> None:
    alice = store.create_user("alice", "hash").id
    bob = store.create_user("bob", "hash").id
    conversation = store.create_conversation(alice).id
    question = store.add_message(alice, conversation, "user", "my secret plan")
    reply = store.add_message(alice, conversation, "assistant", "noted", parent_id=question.id)
    attempts = [
        lambda: store.conversation(bob, conversation),
        lambda: store.path(bob, conversation),
        lambda: store.update_conversation(bob, conversation, title="mine"),
        lambda: store.delete_conversation(bob, conversation),
        lambda: store.add_message(bob, conversation, "user", "hi", parent_id=question.id),
        lambda: store.show_branch(bob, conversation, reply.id),
        lambda: store.rate(bob, reply.id, 1),
        lambda: store.ratings(bob, conversation),
    ]
    for attempt in attempts:
        with pytest.raises(NotFound):
            attempt()
    assert store.conversations(bob) == [] and store.conversations(bob, search="secret") == []
    # Bob's own conversation cannot adopt Alice's messages as parents either.
    own = store.create_conversation(bob).id
    with pytest.raises(NotFound):
        store.add_message(bob, own, "user", "hi", parent_id=question.id)
    assert [t.message.content for t in store.path(alice, conversation)] == ["my secret plan", "noted"]


KILLED_WRITER = """
import sys, time
from tertulia.store.conversations import Store
from tertulia.store.database import open_store
store = Store(open_store(sys.argv[1]))
user = store.local_user().id
conversation = store.create_conversation(user).id
question = store.add_message(user, conversation, "user", "count")
reply = store.add_message(user, conversation, "assistant", "", parent_id=question.id, status="streaming")
print(conversation, flush=True)
i = 0
while True:
    store.append(reply.id, f"{i},")
    i += 1
"""


def test_a_killed_process_loses_no_committed_text(database: Database) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, database.url], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    conversation = process.stdout.readline().strip()
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    store = Store(database)
    assert store.close_interrupted() == 1
    path = store.path(store.local_user().id, conversation)
    assert [t.message.content for t in path][0] == "count"
    reply = path[-1].message
    numbers = reply.content.split(",")[:-1]
    assert reply.status == "incomplete" and reply.content.endswith(",")
    assert numbers == [str(i) for i in range(len(numbers))] and len(numbers) > 5


def test_export_import_round_trip(store: Store) -> None:
    from tertulia.store import transfer

    user = store.local_user().id
    conversation = store.create_conversation(user, system_prompt="Be kind.").id
    question = store.add_message(user, conversation, "user", "¿Qué tal?")
    store.add_message(user, conversation, "assistant", "Bien 😀", parent_id=question.id)
    store.add_message(user, conversation, "assistant", "Muy bien", parent_id=question.id, status="streaming")
    data = transfer.export_json(store, user, conversation)
    copy = transfer.import_json(store, user, data)
    shown = [
        (t.message.role, t.message.content, t.message.status, t.count) for t in store.path(user, copy.id)
    ]
    assert shown == [("user", "¿Qué tal?", "complete", 1), ("assistant", "Muy bien", "incomplete", 2)]
    assert store.conversation(user, copy.id).system_prompt == "Be kind."
    other = store.create_user("other", None).id
    with pytest.raises(NotFound):
        transfer.export_json(store, other, conversation)


def test_a_real_upgrade_keeps_the_data_and_backs_up_sqlite(database: Database) -> None:
    """From the first schema to the latest, with a conversation in it."""
    from alembic import command

    store = Store(database)
    user = store.local_user().id
    conversation = store.create_conversation(user).id
    store.add_message(user, conversation, "user", "still here")
    config = database._alembic()
    with database.engine.begin() as connection:  # back to the first schema, the data in it
        config.attributes["connection"] = connection
        command.downgrade(config, "0001")
    assert database.revision() == "0001"
    backup = database.migrate()
    assert database.revision() == database.head()
    assert [t.message.content for t in store.path(user, conversation)] == ["still here"]
    if database.is_sqlite:
        assert backup is not None and backup.name.startswith("store.db.0001.")
        with sqlite3.connect(backup) as copy:
            assert copy.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]
    else:
        assert backup is None  # PostgreSQL: back up with pg_dump, as the README says


def test_the_local_user_is_created_once_by_concurrent_first_requests(store: Store) -> None:
    """A page's first requests arrive together on a fresh database; each finds the same user."""
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: store.local_user().id, range(16)))
    assert len(set(ids)) == 1


def test_ratings_by_model_sum_every_users_thumbs(store: Store) -> None:
    """What an evaluation report shows: thumbs per model that wrote the reply, over all users."""
    first, second = store.local_user().id, store.create_user("ana", None).id
    for user, model, ratings in (
        (first, "small", (1, 1, -1)),
        (second, "small", (1,)),
        (second, "big", (-1,)),
    ):
        conversation = store.create_conversation(user)
        for rating in ratings:
            reply = store.add_message(user, conversation.id, "assistant", "hi", model=model)
            store.rate(user, reply.id, rating)
    untouched = store.add_message(first, store.create_conversation(first).id, "assistant", "x", model="big")
    store.rate(first, untouched.id, 1)
    store.rate(first, untouched.id, 0)  # taken back: not counted
    assert store.ratings_by_model() == {"small": (3, 1), "big": (0, 1)}
