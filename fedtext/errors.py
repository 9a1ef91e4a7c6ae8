"""The one exception type for user mistakes: the CLI prints it as one line and exits 2."""


class FedtextError(Exception):
    """A problem with the user's input (a file, a line, a client, a flag), not a bug."""
