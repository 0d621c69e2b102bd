"""`tertulia chat`: a streaming terminal chat, or one-shot answers with -p for scripts.

Any provider works: the embedded model (stepped in this thread: one user, full speed), a model file,
or another server (`-m remote:NAME@URL`). Replies are planned by the chat layer like everywhere else.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator

from rich.console import Console

from tertulia.chat.session import ChatSession
from tertulia.cli.progress import LazyProgress
from tertulia.errors import PromptError, TertuliaError
from tertulia.i18n import t
from tertulia.providers import options
from tertulia.providers.base import Provider
from tertulia.providers.local import check_quantization
from tertulia.providers.options import Options, OptionsError
from tertulia.providers.spec import open_provider

# Slash commands that set one option; `/set NAME VALUE` sets any.
OPTION_COMMANDS = {"/temperature": "temperature", "/temp": "temperature", "/max-tokens": "max_tokens"}


def chosen_options(values: dict[str, str | list[str] | dict[str, str] | None]) -> Options:
    """The flags' options, checked by the one table; a refusal is one line naming the option."""
    try:
        return options.parse_text(values)
    except OptionsError as exc:
        raise PromptError(str(exc)) from None


def run_chat(
    *,
    model: str,
    prompt: str | None,
    system: str | None,
    chosen: Options,
    quantize: str,
) -> None:
    err = Console(stderr=True, highlight=False)
    check_quantization(quantize)
    if prompt is not None and not prompt.strip():
        raise PromptError("The prompt is empty.", "Pass some text with -p.")
    if prompt is None:
        err.print(t("loading", model=model), style="dim")
    with LazyProgress(err) as progress:
        provider = open_provider(model, quantization=quantize, max_batch=1, progress=progress, inline=True)
    session = ChatSession(provider, system=system, options=chosen)
    with asyncio.Runner() as runner:
        if prompt is not None:
            _one_shot(runner, session, prompt, err)
        else:
            _repl(runner, session, provider, err)


def _pieces(runner: asyncio.Runner, stream: AsyncIterator[str]) -> Iterator[str]:
    """An async stream read from synchronous code, one piece per turn of the event loop. Ctrl-C
    cancels the piece being awaited (the session keeps the partial reply) and raises here."""
    try:
        while True:
            try:
                yield runner.run(_next(stream))
            except StopAsyncIteration:
                return
    finally:
        runner.run(_close(stream))


async def _next(stream: AsyncIterator[str]) -> str:
    return await anext(stream)


async def _close(stream: AsyncIterator[str]) -> None:
    await stream.aclose()  # type: ignore[attr-defined]


def _one_shot(runner: asyncio.Runner, session: ChatSession, prompt: str, err: Console) -> None:
    for piece in _pieces(runner, session.send(prompt)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if session.last_plan and session.last_plan.dropped:
        err.print(t("dropped", count=session.last_plan.dropped), style="yellow", markup=False)
    if session.last_finish_reason == "length":
        err.print(t("truncated"), style="yellow", markup=False)
    if session.last_finish_reason == "error":
        raise TertuliaError(session.last_error or "The reply broke off.")


def _repl(runner: asyncio.Runner, session: ChatSession, provider: Provider, err: Console) -> None:
    import readline  # noqa: F401  (line editing and history for input())

    out = Console(highlight=False)
    out.print(t("banner", model=provider.name, about=provider.summary), style="bold")
    while True:
        try:
            line = input("› ")
        except (EOFError, KeyboardInterrupt):
            out.print()
            break
        except UnicodeDecodeError:
            out.print("error: that line is not valid UTF-8.", style="red")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not _command(session, text, out):
                break
            continue
        _reply(runner, session, text, out, err)
    out.print(t("bye"), style="dim")


def _reply(runner: asyncio.Runner, session: ChatSession, text: str, out: Console, err: Console) -> None:
    interrupted = False
    try:
        for piece in _pieces(runner, session.send(text)):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
    except TertuliaError as exc:
        err.print(f"error: {exc}", style="red")
        return
    sys.stdout.write("\n")
    notes = []
    if session.last_plan and session.last_plan.dropped:
        notes.append(t("dropped", count=session.last_plan.dropped))
    if interrupted:
        notes.append(t("stopped"))
    elif session.last_finish_reason == "length":
        notes.append(t("truncated"))
    elif session.last_finish_reason == "error":
        notes.append(f"error: {session.last_error}")
    usage = session.last_usage
    if usage and usage.completion_tokens:
        rate = usage.tokens_per_second
        notes.append(t("stats", tokens=usage.completion_tokens, rate=f"{rate:.1f}" if rate else "–"))
    out.print("  " + " · ".join(notes), style="dim", markup=False)


def _command(session: ChatSession, text: str, out: Console) -> bool:
    """Run a slash command; False means leave the chat."""
    command, _, argument = text.partition(" ")
    argument = argument.strip()
    if command in ("/exit", "/quit", "/bye"):
        return False
    if command == "/help":
        out.print(t("help"))
    elif command in ("/reset", "/new", "/clear"):
        session.reset()
        out.print(t("reset"), style="dim")
    elif command == "/system":
        session.system = argument or None
        session.reset()
        out.print(t("system_set" if argument else "system_cleared"), style="dim")
    elif command == "/set" or command in OPTION_COMMANDS:
        name, value = (
            argument.partition(" ")[::2] if command == "/set" else (OPTION_COMMANDS[command], argument)
        )
        _set_option(session, name.strip(), value.strip(), out)
    else:
        out.print(t("unknown_command", command=command), style="yellow")
    return True


def _set_option(session: ChatSession, name: str, value: str, out: Console) -> None:
    """`/set NAME VALUE`: checked by the same table as the flags and the API; `stop` takes one string."""
    try:
        layer = options.parse_text({name: [value] if name == "stop" else value})
        session.options = options.merged(session.options, layer)
    except OptionsError as exc:
        out.print(t("bad_option", error=exc, example="/set temperature 0.7"), style="yellow", markup=False)
        return
    out.print(t("option_set", name=name, value=getattr(session.options, name)), style="dim", markup=False)
