"""Errors that describe bad input.

Every error raised because of what a user passed (a name, a number, a file) derives from
:class:`PoisonReachError`, so the command line can print it as one line instead of a traceback.
The message must name the problem and the fix.
"""


class PoisonReachError(ValueError):
    """Bad input: the message says what is wrong and how to fix it."""


class DatasetNotFoundError(PoisonReachError, FileNotFoundError):
    """The files of a data set are not where the loader looks for them."""


class CorruptFileError(PoisonReachError):
    """A file exists but its contents are truncated, corrupt or fail their checksum."""
