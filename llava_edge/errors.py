"""The one exception type that reaches the user as a one-line message."""


class UserError(Exception):
    """Bad input or an unmet precondition. The CLI prints ``str(err)`` and exits 2."""
