"""Errors a user can act on: each message names the problem and the fix in one line."""


class StudioError(ValueError):
    """Bad input or state the user can fix. The CLI prints the message and exits with status 2."""


class AdapterFileError(StudioError):
    """An adapter file is missing, unreadable, of unknown format, or unsafe to load."""

    def __init__(self, message: str = ""):
        # names inside a file (tensor keys, module paths) may hold line breaks; a message stays one line
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class AdapterMismatchError(StudioError):
    """An adapter does not fit the loaded base model (architecture, module, shape)."""


class GenerationError(StudioError):
    """Generation parameters are invalid (steps, size, guidance, unknown adapters or methods)."""


class ModelLoadError(StudioError):
    """A base model cannot be loaded (missing folder, offline hub id, corrupt files)."""
