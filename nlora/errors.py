"""The one exception type nlora raises for bad input: the CLI prints its message, no traceback."""

import difflib
from collections.abc import Iterable


class NloraError(Exception):
    """A problem with the user's input (config, data, model, output dir), with a message that names it."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the choices closest to a mistyped `word`, "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=2)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
