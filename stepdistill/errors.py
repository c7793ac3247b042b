"""The exception types the CLI turns into one line: bad user input (exit 2) and a run stopped by a
signal after its final checkpoint (exit 128 + the signal's number)."""


class UserError(Exception):
    """Bad input named in one sentence, with the fix. Raised before any compute is spent."""


class Interrupted(Exception):
    """A run stopped cleanly by SIGINT or SIGTERM; ``code`` is the exit status (130 or 143)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
