"""The user-facing errors: each carries one message that names the key, file or run at fault."""


class DiffencError(Exception):
    """A mistake in what the user handed us (config, data file, checkpoint, run name)."""


class ConfigError(DiffencError):
    """A bad key or value in params.yaml or a --set override."""


class DataError(DiffencError):
    """A missing, malformed or inconsistent data file."""


class CheckpointError(DiffencError):
    """A missing, corrupt or foreign checkpoint."""


class RunError(DiffencError):
    """An unknown or unreadable run directory."""


class DivergenceError(DiffencError):
    """Training produced non-finite values and could not recover."""
