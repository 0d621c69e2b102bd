"""`tertulia chat`: a streaming terminal chat, or one-shot answers with -p for scripts."""

from __future__ import annotations

import sys
from dataclasses import replace

from rich.console import Console

from tertulia.chat.session import ChatSession
from tertulia.cli.progress import LazyProgress
from tertulia.engine.quant import check_mode
from tertulia.engine.sampling import MAX_TEMPERATURE, SamplingParams
from tertulia.errors import PromptError, TertuliaError
from tertulia.i18n import t
from tertulia.providers.local import LocalProvider


def run_chat(
    *,
    model: str,
    prompt: str | None,
    system: str | None,
    temperature: float,
    top_p: float,
    repetition_penalty: float,
    max_tokens: int | None,
    seed: int | None,
    quantize: str,
) -> None:
    err = Console(stderr=True, highlight=False)
    params = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        max_tokens=max_tokens,
        seed=seed,
    )
    try:
        params.validate(vocab_size=1 << 30)
    except ValueError as exc:
        raise PromptError(str(exc)) from None
    check_mode(quantize, allow_auto=True)
    if prompt is not None and not prompt.strip():
        raise PromptError("The prompt is empty.", "Pass some text with -p.")
    if prompt is None:
        err.print(t("loading", model=model), style="dim")
    with LazyProgress(err) as progress:
        provider = LocalProvider.load(model, quantization=quantize, max_batch=1, progress=progress)
    session = ChatSession(provider, system=system, params=params)
    if prompt is not None:
        _one_shot(session, prompt, err)
    else:
        _repl(session, provider, err)


def _one_shot(session: ChatSession, prompt: str, err: Console) -> None:
    for piece in session.send(prompt):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if session.last_fit and session.last_fit.dropped:
        err.print(t("dropped", count=session.last_fit.dropped), style="yellow", markup=False)
    if session.last_finish_reason == "length":
        err.print(t("truncated"), style="yellow", markup=False)


def _repl(session: ChatSession, provider: LocalProvider, err: Console) -> None:
    import readline  # noqa: F401  (line editing and history for input())

    out = Console(highlight=False)
    out.print(
        t("banner", model=provider.name, quant=provider.engine.quantization, context=provider.context_length),
        style="bold",
    )
    while True:
        try:
            line = input("› ")
        except EOFError:
            out.print()
            break
        except KeyboardInterrupt:
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
        _reply(session, text, out, err)
    out.print(t("bye"), style="dim")


def _reply(session: ChatSession, text: str, out: Console, err: Console) -> None:
    interrupted = False
    try:
        for piece in session.send(text):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
    except TertuliaError as exc:
        err.print(f"error: {exc}", style="red")
        return
    sys.stdout.write("\n")
    notes = []
    if session.last_fit and session.last_fit.dropped:
        notes.append(t("dropped", count=session.last_fit.dropped))
    if interrupted:
        notes.append(t("stopped"))
    elif session.last_finish_reason == "length":
        notes.append(t("truncated"))
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
    elif command in ("/temperature", "/temp"):
        value = _number(argument, float)
        if value is None or not 0 <= value <= MAX_TEMPERATURE:
            out.print(t("bad_number", command=command, example="/temperature 0.7"), style="yellow")
        else:
            session.params = replace(session.params, temperature=value)
            out.print(t("temperature_set", value=value), style="dim")
    elif command == "/max-tokens":
        value = _number(argument, int)
        if value is None or value < 1:
            out.print(t("bad_number", command=command, example="/max-tokens 256"), style="yellow")
        else:
            session.params = replace(session.params, max_tokens=int(value))
            out.print(t("max_tokens_set", value=value), style="dim")
    else:
        out.print(t("unknown_command", command=command), style="yellow")
    return True


def _number(text: str, kind: type) -> float | None:
    try:
        return kind(text)
    except ValueError:
        return None
