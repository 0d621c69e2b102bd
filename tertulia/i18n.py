"""Interface messages in English and Spanish; the language comes from TERTULIA_LANG or the locale."""

from __future__ import annotations

import os

MESSAGES: dict[str, dict[str, str]] = {
    "banner": {
        "en": "Tertulia · {model} ({about}) · /help for commands, /exit to leave",
        "es": "Tertulia · {model} ({about}) · /help para ayuda, /exit para salir",
    },
    "help": {
        "en": (
            "/reset            start a new conversation\n"
            "/system TEXT      set the system prompt (empty: the model's default) and start over\n"
            "/set NAME VALUE   a sampling option: temperature, top_p, top_k, min_p, seed, max_tokens,\n"
            "                  stop, repetition_penalty, frequency_penalty, presence_penalty\n"
            "/temperature T    sampling temperature (0 = always the most likely token)\n"
            "/max-tokens N     longest reply, in tokens\n"
            "/help             this help\n"
            "/exit             leave (Ctrl-D works too; Ctrl-C stops a reply)"
        ),
        "es": (
            "/reset            empezar una conversación nueva\n"
            "/system TEXTO     fijar el prompt de sistema (vacío: el del modelo) y empezar de nuevo\n"
            "/set NOMBRE VALOR una opción de muestreo: temperature, top_p, top_k, min_p, seed, max_tokens,\n"
            "                  stop, repetition_penalty, frequency_penalty, presence_penalty\n"
            "/temperature T    temperatura de muestreo (0 = siempre el token más probable)\n"
            "/max-tokens N     longitud máxima de la respuesta, en tokens\n"
            "/help             esta ayuda\n"
            "/exit             salir (también Ctrl-D; Ctrl-C detiene una respuesta)"
        ),
    },
    "reset": {"en": "New conversation.", "es": "Conversación nueva."},
    "system_set": {
        "en": "System prompt set; new conversation.",
        "es": "Prompt de sistema fijado; conversación nueva.",
    },
    "system_cleared": {
        "en": "System prompt back to the model's default; new conversation.",
        "es": "Prompt de sistema del modelo restaurado; conversación nueva.",
    },
    "option_set": {"en": "{name} = {value}", "es": "{name} = {value}"},
    "bad_option": {
        "en": "Not changed: {error}. For example: {example}",
        "es": "Sin cambios: {error}. Por ejemplo: {example}",
    },
    "unknown_command": {
        "en": "Unknown command {command}. /help lists the commands.",
        "es": "Comando desconocido {command}. /help muestra los comandos.",
    },
    "stats": {"en": "{tokens} tokens · {rate} tok/s", "es": "{tokens} tokens · {rate} tok/s"},
    "stopped": {"en": "[stopped]", "es": "[detenido]"},
    "truncated": {"en": "[reply cut at the token limit]", "es": "[respuesta cortada en el límite de tokens]"},
    "dropped": {
        "en": "{count} earlier message(s) left out to fit the model's context.",
        "es": "{count} mensaje(s) anteriores omitidos para caber en el contexto del modelo.",
    },
    "loading": {"en": "Loading {model}…", "es": "Cargando {model}…"},
    "bye": {"en": "Bye!", "es": "¡Hasta luego!"},
}


def language() -> str:
    for var in ("TERTULIA_LANG", "LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(var, "")
        if value:
            return "es" if value.lower().startswith("es") else "en"
    return "en"


def t(key: str, **values: object) -> str:
    """The message `key` in the current language, formatted with `values`."""
    entry = MESSAGES[key]
    return entry.get(language(), entry["en"]).format(**values)
