"""The one exception type for user mistakes: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (a file, an argument, a model that does not fit).

    The message must be one line that names the file or argument and the problem.
    """
