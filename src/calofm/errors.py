"""One exception type for every problem a user can cause.

The command line turns a CalofmError into one line on stderr and exit code 2, with no traceback;
anything else is a bug and keeps its traceback.
"""


class CalofmError(Exception):
    """Bad input or a request calofm cannot satisfy; the message names the problem."""
