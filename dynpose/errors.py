"""One exception type for every user-facing failure.

The CLIs catch `DynPoseError` and print its message as one line with a non-zero exit; anything else is a bug and
keeps its traceback. Messages say what went wrong, where, and what to do.
"""


class DynPoseError(Exception):
    """A problem with the user's input, files or environment (not a bug in dynpose)."""
