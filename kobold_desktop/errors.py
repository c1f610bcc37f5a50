"""The root of every error a user can act on.

The GUI shows these in a dialog, the CLI prints them on stderr and exits 2, the server
answers 4xx. Anything that is not a `KoboldError` is a bug.
"""


class KoboldError(Exception):
    """An error caused by input or circumstances the user can fix; its message says how."""

    # The HTTP status a server answers it with: the request's fault unless a subclass says
    # otherwise (a remote backend that cannot be reached is a 502).
    status: int = 400
