"""User-facing errors: one line that says what went wrong and what to do.

Interfaces catch `TertuliaError` and print `message` (CLI) or map it to an HTTP 4xx (server);
anything else is a bug and may show a traceback.
"""

from __future__ import annotations


class TertuliaError(Exception):
    """An error caused by input or environment, explained for the user."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}" if self.hint else self.message


class ModelLoadError(TertuliaError):
    """The model file/directory is missing, corrupt or unsupported."""


class PromptError(TertuliaError):
    """The prompt is empty or does not fit in the model's context."""

    def __init__(
        self, message: str, hint: str | None = None, *, code: str = "invalid_prompt", param: str | None = None
    ) -> None:
        super().__init__(message, hint)
        self.code = code
        self.param = param  # the request field at fault, when the raiser knows it
