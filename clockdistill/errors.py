"""User-facing errors: one line naming the file or field and what was expected.

The CLI prints `error: <message>` for these and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class UserError(ValueError):
    """Bad input from the user (a file, a config key, a value). The message is one line."""


class ConfigError(UserError):
    """A config key or value is unknown or of the wrong form."""


class DataError(UserError):
    """A data set, annotation file or image is missing or violates its schema."""


class TrainingDiverged(RuntimeError):
    """The loss or the predictions became NaN or infinite."""
