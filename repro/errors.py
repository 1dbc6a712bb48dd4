"""The one exception type that reaches the user: a single line naming the culprit and the fix.

Every module raises `UserError` for bad input it can explain; the CLI prints its message on one line and exits
with code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Bad input the user can fix. The message is one line: what is wrong, where, and what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
