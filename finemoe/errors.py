"""Typed errors. Library code raises these; the CLI turns them into one sentence and exit code 1."""


class FinemoeError(Exception):
    """Base of every error a user can cause (bad input, bad configuration)."""


class TraceError(FinemoeError):
    """A trace file is missing, corrupt, of the wrong version or inconsistent."""


class ConfigError(FinemoeError):
    """A configuration value is malformed or impossible (e.g. a memory budget below the dense weights)."""


class MissingFieldError(FinemoeError):
    """A policy or command needs a trace field this trace does not carry."""


class OutputError(FinemoeError):
    """An output could not be written (folder not writable, disk full, a path under a regular file)."""
