"""The one exception type nlora raises for bad input: the CLI prints its message, no traceback."""


class NloraError(Exception):
    """A problem with the user's input (config, data, model, output dir), with a message that names it."""
