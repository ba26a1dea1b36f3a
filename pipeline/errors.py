"""Errors the launcher turns into one clear message and a non-zero exit (no traceback)."""


class PipelineError(Exception):
    """Base class: the message is shown to the user as is."""


class ConfigError(PipelineError):
    """A setting, cluster config or input path is invalid; nothing was submitted."""


class PrerequisiteError(PipelineError):
    """A stage was asked for while a stage it depends on is incomplete."""


class StageFailed(PipelineError):
    """One or more shards of a stage failed (their log paths are in the message)."""


class LockHeld(PipelineError):
    """Another launch holds the work dir lock."""
