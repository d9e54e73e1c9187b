class StartupError(ValueError):
    """Something the user must change before the server or pipeline can start (a flag, a checkpoint
    file, an environment variable). A room that raises it at start-up reports the message alone,
    not a traceback."""
