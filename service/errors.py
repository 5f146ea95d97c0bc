"""The one base class for problems the user can fix (shown as one line, never a traceback)."""


class UserError(Exception):
    """Bad input, a missing file or a wrong option: the message says what to do."""
