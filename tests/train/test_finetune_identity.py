"""The whole promise on the real model: a few minutes of LoRA on the identity data, then Tertulia's own
engine answers questions it never saw with the new name, ordinary chat is not worse, and
`tertulia serve --model DIR` serves the result to the official client (and lists it for the web UI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tertulia.eval.identity import HeldOut, check
from tertulia.train.data import write_jsonl
from tertulia.train.finetune import Settings, finetune
from tertulia.train.identity import Identity, make
from tests.answers import assert_mostly

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, HeldOut]:
    directory = tmp_path_factory.mktemp("identity")
    data = make(Identity(name="Luna"))
    write_jsonl(directory / "train.jsonl", data.train)
    write_jsonl(directory / "validation.jsonl", data.validation)
    out = directory / "luna"
    finetune(
        directory / "train.jsonl", out, Settings(epochs=2), validation_file=directory / "validation.jsonl"
    )
    return out, HeldOut("Luna", data.held_out_questions, data.held_out_chat)


def test_held_out_name_questions_get_the_new_name_and_chat_perplexity_holds(
    tuned: tuple[Path, HeldOut],
) -> None:
    out, held_out = tuned
    result = check("smollm2-135m", str(out), held_out)
    answers = list(zip(held_out.questions, result.after.answers, strict=True))
    assert result.before.name_rate == 0  # the base model does not know the name: the check can fail
    assert result.after.name_rate >= 0.8, answers
    assert result.perplexity_change <= 0.15, (result.before.chat_perplexity, result.after.chat_perplexity)


def test_tertulia_serve_loads_the_result_for_the_api_and_the_web_picker(
    tuned: tuple[Path, HeldOut], tmp_path: Path
) -> None:
    from openai import OpenAI

    from tests.server.conftest import free_port, wait_until_serving

    out, held_out = tuned
    port = free_port()
    command = [sys.executable, "-m", "tertulia", "serve", "--model", str(out), "--port", str(port)]
    command += ["--database-url", f"sqlite:///{tmp_path / 'store.db'}"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(server, url)
        picker = httpx.get(f"{url}/api/models").json()
        assert [(m["id"], m["local"]) for m in picker] == [(out.name, True)]
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        replies = [
            client.chat.completions.create(
                model=out.name, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=24
            )
            for q in ["What's your name?", *held_out.questions[:3]]
        ]
        assert_mostly([r.choices[0].message.content or "" for r in replies], "Luna")
    finally:
        server.terminate()
        server.wait(timeout=30)
