"""Hostile inputs shared by tests: a pickle that runs code when it is loaded."""


class CreatesFileWhenUnpickled:
    """A pickle payload: unpickling it calls ``open(path, "w")`` (pickled as ``io.open``), creating the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")
