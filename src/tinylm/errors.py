"""The one exception type a user can act on."""


class TinylmError(Exception):
    """A problem the user can fix.

    Its message is one line that says what to do; the CLI prints it without a traceback.
    """
