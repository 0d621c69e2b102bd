"""Conversations as the interfaces use them: every call is scoped to a user.

A conversation or message that belongs to someone else is reported exactly like one that does not
exist (`NotFound`), so ids cannot be probed. Replies are saved while they stream (`append`), and a
reply the server never finished (stopped, a closed tab, a killed process) ends up `incomplete` with
what was generated so far, never lost and never half-written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tertulia.errors import TertuliaError
from tertulia.store.database import Database
from tertulia.store.schema import Conversation, Feedback, Message, Persona, User, now

LOCAL_USER = "local"
TITLE_LENGTH = 60
ROLES = ("system", "user", "assistant")


class NotFound(TertuliaError):
    """No such conversation, message or persona for this user."""


@dataclass
class Turn:
    """A message on the shown path, with its place among its siblings (‹ index+1 / count ›)."""

    message: Message
    index: int
    count: int
    sibling_ids: list[str]


def title_from(text: str) -> str:
    """The first line of the first message, shortened at a word boundary."""
    line = " ".join(text.split())
    if len(line) <= TITLE_LENGTH:
        return line or "New chat"
    cut = line[:TITLE_LENGTH].rsplit(" ", 1)[0] or line[:TITLE_LENGTH]
    return cut + "…"


class Store:
    def __init__(self, database: Database) -> None:
        self.db = database

    # --- users --------------------------------------------------------------------------------
    def local_user(self) -> User:
        """The single user of a server without --auth (created on first use).

        A page's first requests arrive together: when two create the user at once, the one that loses
        the unique name reads the winner's row.
        """
        for attempt in range(2):
            try:
                with self.db.session() as s:
                    user = s.scalar(select(User).where(User.name == LOCAL_USER))
                    if user is None:
                        user = User(name=LOCAL_USER, password_hash=None, is_admin=True)
                        s.add(user)
                    return user
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def create_user(self, name: str, password_hash: str | None, *, is_admin: bool = False) -> User:
        with self.db.session() as s:
            if s.scalar(select(User).where(User.name == name)) is not None:
                raise TertuliaError(f"The user {name!r} already exists.")
            user = User(name=name, password_hash=password_hash, is_admin=is_admin)
            s.add(user)
            return user

    def user_by_name(self, name: str) -> User | None:
        with self.db.session() as s:
            return s.scalar(select(User).where(User.name == name))

    # --- personas -----------------------------------------------------------------------------
    def create_persona(self, user_id: str, name: str, instructions: str = "", **fields: Any) -> Persona:
        with self.db.session() as s:
            persona = Persona(user_id=user_id, name=name, instructions=instructions, **fields)
            s.add(persona)
            return persona

    def personas(self, user_id: str) -> list[Persona]:
        with self.db.session() as s:
            return list(s.scalars(select(Persona).where(Persona.user_id == user_id).order_by(Persona.name)))

    def persona(self, user_id: str, persona_id: str) -> Persona:
        with self.db.session() as s:
            return self._owned(s, Persona, persona_id, user_id)

    def update_persona(self, user_id: str, persona_id: str, **fields: Any) -> Persona:
        with self.db.session() as s:
            persona = self._owned(s, Persona, persona_id, user_id)
            for key, value in fields.items():
                setattr(persona, key, value)
            return persona

    def delete_persona(self, user_id: str, persona_id: str) -> None:
        with self.db.session() as s:
            s.delete(self._owned(s, Persona, persona_id, user_id))

    # --- conversations ------------------------------------------------------------------------
    def create_conversation(self, user_id: str, **fields: Any) -> Conversation:
        with self.db.session() as s:
            if fields.get("persona_id"):
                self._owned(s, Persona, fields["persona_id"], user_id)
            conversation = Conversation(user_id=user_id, **fields)
            s.add(conversation)
            return conversation

    def conversation(self, user_id: str, conversation_id: str) -> Conversation:
        with self.db.session() as s:
            return self._owned(s, Conversation, conversation_id, user_id)

    def conversations(
        self, user_id: str, *, search: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[Conversation]:
        """Newest first; `search` matches titles and message text (case-insensitive)."""
        query = select(Conversation).where(Conversation.user_id == user_id)
        if search:
            pattern = f"%{_escape_like(search)}%"
            in_messages = select(Message.conversation_id).where(Message.content.ilike(pattern, escape="\\"))
            query = query.where(
                or_(Conversation.title.ilike(pattern, escape="\\"), Conversation.id.in_(in_messages))
            )
        query = query.order_by(Conversation.updated_at.desc(), Conversation.id).limit(limit).offset(offset)
        with self.db.session() as s:
            return list(s.scalars(query))

    def update_conversation(self, user_id: str, conversation_id: str, **fields: Any) -> Conversation:
        """Rename, or change the system prompt, persona, model or settings."""
        with self.db.session() as s:
            conversation = self._owned(s, Conversation, conversation_id, user_id)
            if fields.get("persona_id"):
                self._owned(s, Persona, fields["persona_id"], user_id)
            for key, value in fields.items():
                setattr(conversation, key, value)
            conversation.updated_at = now()
            return conversation

    def delete_conversation(self, user_id: str, conversation_id: str) -> None:
        with self.db.session() as s:
            conversation = self._owned(s, Conversation, conversation_id, user_id)
            # Detach the tree, then delete its rows: a self-referencing cascade is left to no
            # backend's ordering rules.
            s.execute(delete(Feedback).where(Feedback.message_id.in_(_ids_of(conversation.id))))
            s.execute(
                update(Message).where(Message.conversation_id == conversation.id).values(parent_id=None)
            )
            s.execute(delete(Message).where(Message.conversation_id == conversation.id))
            s.delete(conversation)

    # --- messages -----------------------------------------------------------------------------
    def add_message(
        self,
        user_id: str,
        conversation_id: str,
        role: str,
        content: str,
        *,
        parent_id: str | None = None,
        status: str = "complete",
        model: str | None = None,
    ) -> Message:
        """Add a message under `parent_id` (None: a root) and show its branch.

        Editing a message is adding a sibling (same parent); regenerating a reply is adding a sibling
        reply. The first user message names the conversation if it still has the default title.
        """
        if role not in ROLES:
            raise TertuliaError(f"Unknown role {role!r}; use one of {', '.join(ROLES)}.")
        with self.db.session() as s:
            conversation = self._owned(s, Conversation, conversation_id, user_id, lock=True)
            if parent_id is not None:
                parent = s.get(Message, parent_id)
                if parent is None or parent.conversation_id != conversation.id:
                    raise NotFound("No such message in this conversation.")
            message = Message(
                conversation_id=conversation.id,
                parent_id=parent_id,
                role=role,
                content=content,
                status=status,
                model=model,
            )
            s.add(message)
            s.flush()
            conversation.current_leaf_id = message.id
            conversation.updated_at = now()
            if role == "user" and conversation.title == "New chat":
                conversation.title = title_from(content)
            return message

    def append(self, message_id: str, text: str) -> None:
        """Save more of a reply while it streams (one short transaction per call)."""
        with self.db.session() as s:
            s.execute(
                update(Message)
                .where(Message.id == message_id, Message.status == "streaming")
                .values(content=Message.content + text)
            )

    def finish(
        self,
        message_id: str,
        status: str = "complete",
        *,
        completion_tokens: int | None = None,
        tokens_per_second: float | None = None,
    ) -> None:
        with self.db.session() as s:
            s.execute(
                update(Message)
                .where(Message.id == message_id)
                .values(
                    status=status, completion_tokens=completion_tokens, tokens_per_second=tokens_per_second
                )
            )

    def close_interrupted(self) -> int:
        """Mark replies left 'streaming' by a previous process as incomplete (called on start)."""
        with self.db.session() as s:
            result = s.execute(
                update(Message).where(Message.status == "streaming").values(status="incomplete")
            )
            return result.rowcount or 0

    def path(self, user_id: str, conversation_id: str, leaf_id: str | None = None) -> list[Turn]:
        """The conversation as shown: root to leaf (the current one by default), with branch info."""
        with self.db.session() as s:
            conversation = self._owned(s, Conversation, conversation_id, user_id)
            messages = list(s.scalars(select(Message).where(Message.conversation_id == conversation.id)))
        by_id = {m.id: m for m in messages}
        children: dict[str | None, list[Message]] = {}
        for message in sorted(messages, key=lambda m: (m.created_at, m.id)):
            children.setdefault(message.parent_id, []).append(message)
        leaf = by_id.get(leaf_id or conversation.current_leaf_id or "")
        if leaf_id is not None and leaf is None:
            raise NotFound("No such message in this conversation.")
        chain: list[Message] = []
        while leaf is not None:
            chain.append(leaf)
            leaf = by_id.get(leaf.parent_id or "")
        turns = []
        for message in reversed(chain):
            siblings = children[message.parent_id]
            ids = [m.id for m in siblings]
            turns.append(Turn(message, ids.index(message.id), len(ids), ids))
        return turns

    def show_branch(self, user_id: str, conversation_id: str, message_id: str) -> list[Turn]:
        """Switch to the branch through `message_id`, down to its newest leaf; return the new path."""
        with self.db.session() as s:
            conversation = self._owned(s, Conversation, conversation_id, user_id, lock=True)
            message = s.get(Message, message_id)
            if message is None or message.conversation_id != conversation.id:
                raise NotFound("No such message in this conversation.")
            leaf = message
            while True:
                newest = s.scalar(
                    select(Message)
                    .where(Message.parent_id == leaf.id)
                    .order_by(Message.created_at.desc(), Message.id.desc())
                    .limit(1)
                )
                if newest is None:
                    break
                leaf = newest
            conversation.current_leaf_id = leaf.id
        return self.path(user_id, conversation_id)

    # --- feedback -----------------------------------------------------------------------------
    def rate(self, user_id: str, message_id: str, rating: int, comment: str | None = None) -> None:
        """Thumbs up (1), down (-1), or 0 to take the rating back."""
        if rating not in (-1, 0, 1):
            raise TertuliaError("A rating is 1 (up), -1 (down) or 0 (none).")
        with self.db.session() as s:
            message = s.get(Message, message_id)
            if message is None or message.role != "assistant":
                raise NotFound("No such reply.")
            self._owned(s, Conversation, message.conversation_id, user_id)
            s.execute(delete(Feedback).where(Feedback.message_id == message_id, Feedback.user_id == user_id))
            if rating:
                s.add(Feedback(message_id=message_id, user_id=user_id, rating=rating, comment=comment))

    def ratings(self, user_id: str, conversation_id: str) -> dict[str, int]:
        with self.db.session() as s:
            conversation = self._owned(s, Conversation, conversation_id, user_id)
            rows = s.execute(
                select(Feedback.message_id, Feedback.rating).where(
                    Feedback.user_id == user_id, Feedback.message_id.in_(_ids_of(conversation.id))
                )
            )
            return {message_id: rating for message_id, rating in rows}

    def ratings_by_model(self) -> dict[str, tuple[int, int]]:
        """Thumbs (up, down) on replies, summed per model that wrote them, over every user: what an
        evaluation report shows beside its measurements."""
        with self.db.session() as s:
            rows = s.execute(
                select(Message.model, Feedback.rating, func.count())
                .join(Message, Feedback.message_id == Message.id)
                .group_by(Message.model, Feedback.rating)
            )
            summary: dict[str, list[int]] = {}
            for model, rating, count in rows:
                counts = summary.setdefault(model or "unknown", [0, 0])
                counts[0 if rating > 0 else 1] += count
            return {model: (up, down) for model, (up, down) in summary.items()}

    # --- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _owned(s: Session, table: Any, row_id: str, user_id: str, *, lock: bool = False) -> Any:
        query = select(table).where(table.id == row_id, table.user_id == user_id)
        if lock:  # serialize writers of one conversation (two tabs); SQLite ignores it (one writer)
            query = query.with_for_update()
        row = s.scalar(query)
        if row is None:
            raise NotFound(f"No such {table.__name__.lower()}.")
        return row


def _ids_of(conversation_id: str) -> Any:
    return select(Message.id).where(Message.conversation_id == conversation_id)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
