"""The one exception type for bad user input: the CLI prints its message and exits 2."""


class UserError(Exception):
    """Bad input named in one sentence, with the fix. Raised before any compute is spent."""
