"""User errors: the command-line tools print the message as one line and exit with code 2."""


class UserError(Exception):
    """A mistake in the user's input; the message names the field or file and the fix."""
