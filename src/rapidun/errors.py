"""One exception type for every problem a user can fix; the CLI prints its message without a traceback."""


class RapidunError(Exception):
    """A user-facing error: says what was wrong, where (file, line, field, id) and what to do."""
