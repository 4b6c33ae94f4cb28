"""The one exception type that reaches the user as a short message instead of a traceback."""


class GemmatuneError(Exception):
    """A problem the user can fix: the message says what is wrong and what to do.

    The CLI prints it as one line (two at most) and exits with code 2; `--debug` shows the traceback.
    """

    exit_code = 2
