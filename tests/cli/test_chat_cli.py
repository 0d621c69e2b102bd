"""`tertulia chat` and `tertulia models` as a user runs them: real processes, the real model."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from tests.answers import PARIS_QUESTIONS, ask_in_terminal_chat, assert_mostly
from tests.server.conftest import LiveServer

pytestmark = pytest.mark.slow


def tertulia(*args: str, stdin: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, TERTULIA_LANG="en")
    return subprocess.run(
        [sys.executable, "-m", "tertulia", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_one_shot_prints_just_the_answer_the_chat_gives(embedded_dir) -> None:
    answers, _ = ask_in_terminal_chat(PARIS_QUESTIONS)
    assert_mostly(answers, "Paris")
    result = tertulia("chat", "-p", PARIS_QUESTIONS[0], "--temperature", "0", "--max-tokens", "32")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == answers[0].split()  # the same greedy reply, whitespace aside
    # -p prints only the answer: no banner, no stats on stdout.
    assert "Tertulia" not in result.stdout and "tok/s" not in result.stdout
    assert "Traceback" not in result.stderr


def test_one_shot_reads_stdin_and_honours_max_tokens(embedded_dir) -> None:
    result = tertulia(
        "chat", "-p", "-", "--temperature", "0", "--max-tokens", "3", stdin="Count from 1 to 50."
    )
    assert result.returncode == 0, result.stderr
    assert 0 < len(result.stdout.strip()) < 40


def test_interactive_session_keeps_history_and_runs_commands(embedded_dir) -> None:
    script = "\n".join(
        [
            "/help",
            "/temperature 0",
            "/temperature hot",
            "/set top_k 40",
            "/set seed 1.5",
            "My name is Alice. Reply with just OK.",
            "What is my name?",
            "/reset",
            "/nonsense",
            "/exit",
        ]
    )
    result = tertulia("chat", "--max-tokens", "24", stdin=script + "\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "/system" in out  # the help text
    assert "temperature = 0" in out and "top_k = 40" in out
    assert "Not changed: temperature: Input should be a valid number" in out
    assert "Not changed: seed: Input should be a valid integer" in out
    assert "tok/s" in out
    assert "New conversation." in out
    assert "Unknown command /nonsense" in out
    assert "Traceback" not in result.stderr


def test_ctrl_c_stops_a_reply_and_keeps_the_chat(embedded_dir) -> None:
    """Ctrl-C mid-reply stops it at once, keeps what was written in the history, and the chat goes on."""
    env = dict(os.environ, TERTULIA_LANG="en", PYTHONUNBUFFERED="1")
    # The end-of-turn tokens banned: the reply cannot end by itself before it is interrupted.
    args = ["chat", "--max-tokens", "400", "--logit-bias", "0=-100", "--logit-bias", "2=-100"]
    chat = subprocess.Popen(
        [sys.executable, "-m", "tertulia", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert chat.stdin is not None and chat.stdout is not None
    said = b""

    def read_until(done: Callable[[bytes], bool], timeout: float) -> None:
        nonlocal said
        deadline = time.monotonic() + timeout
        while not done(said) and time.monotonic() < deadline:
            if select.select([chat.stdout], [], [], 0.2)[0]:
                said += os.read(chat.stdout.fileno(), 4096)

    try:
        read_until(lambda text: "›".encode() in text, 120)  # the prompt: the chat is ready
        chat.stdin.write(b"Write a very long story about a dragon.\n")
        chat.stdin.flush()
        start = len(said)
        read_until(lambda text: len(text) - start > 40, 60)
        chat.send_signal(signal.SIGINT)
        read_until(lambda text: b"[stopped]" in text, 30)
        chat.stdin.write(b"/exit\n")
        chat.stdin.flush()
        rest, errors = chat.communicate(timeout=60)
    finally:
        chat.kill()
    output = (said + rest).decode(errors="replace")
    assert "[stopped]" in output and "Bye!" in output, output
    assert chat.returncode == 0 and b"Traceback" not in errors, errors


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["chat", "-p", ""], "empty"),
        (["chat", "-p", "hi", "--temperature", "-1"], "temperature"),
        (["chat", "-m", "/no/such/model", "-p", "hi"], "No model"),
        (["chat", "-p", "hi", "--quantize", "int3"], "quantization"),
        (["chat", "-p", "word " * 9000, "--max-tokens", "8"], "context"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args: list[str], fragment: str, embedded_dir) -> None:
    result = tertulia(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert fragment.lower() in lines[0].lower()


def test_chat_with_a_model_on_another_tertulia(live_server: LiveServer) -> None:
    """`-m remote:NAME@URL`: the same one-shot and interactive chat, answered by another server."""
    remote = f"remote:smollm2-135m@{live_server.base_url}"
    asked = ["-p", PARIS_QUESTIONS[0], "--temperature", "0", "--max-tokens", "32"]
    here, there = tertulia("chat", *asked), tertulia("chat", "-m", remote, *asked)
    assert there.returncode == 0, there.stderr
    assert "Paris" in there.stdout and there.stdout == here.stdout  # the same greedy reply
    script = "My name is Alice. Reply with just OK.\nWhat is my name?\n/exit\n"
    result = tertulia("chat", "-m", remote, "--max-tokens", "16", "--temperature", "0", stdin=script)
    assert result.returncode == 0, result.stderr
    assert f"smollm2-135m (remote at {live_server.base_url})" in result.stdout and "tok/s" in result.stdout
    gone = tertulia("chat", "-m", "remote:x@http://127.0.0.1:9/v1", "-p", "hi")
    assert gone.returncode == 1 and "unreachable" in gone.stderr and "Traceback" not in gone.stderr


def test_models_lists_the_embedded_default() -> None:
    result = tertulia("models")
    assert result.returncode == 0
    assert "smollm2-135m" in result.stdout
