"""One error type: a message saying what is wrong and a hint saying what to do."""


class BundleError(Exception):
    """A bundle, key or trust store that cannot be used as asked. `str()` is the whole message."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message}; {hint}" if hint else message)
