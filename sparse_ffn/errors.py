"""The one exception type for user mistakes: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (a file, an argument, a model that does not fit).

    The message must be one line that names the file or argument and the problem.
    """


def install_excepthook() -> None:
    """Make an uncaught UserError print one line (no traceback) and exit 2, in any host program.

    Used where we are a plugin in someone else's CLI (the stock `lm_eval` script), which does not
    catch exceptions itself. Other exceptions keep the previous hook.
    """
    import sys

    previous = sys.excepthook
    if getattr(previous, "_sparse_ffn", False):
        return

    def hook(exc_type, exc, tb):  # type: ignore[no-untyped-def]
        if issubclass(exc_type, UserError):
            sys.stderr.write(f"sparse-ffn: error: {exc}\n")
            sys.stderr.flush()
            import os

            os._exit(2)
        previous(exc_type, exc, tb)

    hook._sparse_ffn = True  # type: ignore[attr-defined]
    sys.excepthook = hook
