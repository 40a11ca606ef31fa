"""The one exception type for input a user can fix.

Library code raises ``UserError`` with a message that says what was wrong and how to fix it; the CLI
prints that message on one line and exits non-zero, the server answers it with HTTP 4xx.
"""


class UserError(ValueError):
    """Bad input: a wrong argument, an unreadable file, an unsupported model."""
