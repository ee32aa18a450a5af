"""The package's user-error type: the one exception ``convit-ssl`` prints as one line instead of a traceback.

Leaf module (no imports), so that every layer, the model included, can raise it. A ``UsageError`` is a
``ValueError``: code that calls the library catches bad input as it always did.
"""


class UsageError(ValueError):
    """A mistake in the user's input (an argument, a config, a file given); the message names it and the fix."""
