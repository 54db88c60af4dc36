"""The one error family a stage turns into a single line and a non-zero exit (no traceback)."""


class PipelineError(Exception):
    """Bad input a user can fix: the message names the problem and the fix."""
