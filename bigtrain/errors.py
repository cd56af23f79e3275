"""The one exception family for mistakes in the user's input (config, files, data, checkpoints).

The command line prints such an error as a single `bigtrain: error: ...` line naming the key, file or value
and what was expected, and exits with status 2; anything else is a bug and keeps its traceback.
"""


class BigtrainError(Exception):
    """A problem with the user's input, stated in one line."""
