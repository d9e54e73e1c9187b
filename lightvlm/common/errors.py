class StartupError(ValueError):
    """Something the user must change before the server or pipeline can start (a flag, a checkpoint
    file, an environment variable). A room that raises it at start-up reports the message alone,
    not a traceback."""


class PromptError(ValueError):
    """A request whose prompt and media do not fit together, or that asks for what the model cannot
    do; the message says how to fix it (the httpserver answers 400). Raised by the processors."""
