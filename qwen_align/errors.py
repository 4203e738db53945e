"""Errors meant for the user: the CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input (recipe, data, flags). The message names the file, line or field and what would be right."""


class RecipeError(UserError):
    pass


class DataError(UserError):
    pass


class Interrupted(KeyboardInterrupt):
    """A stage stopped by SIGTERM/SIGINT after saving a checkpoint at a step boundary; a rerun resumes it."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"interrupted at step {step}; rerun the same command to resume")
        self.step = step
        self.signal_name = signal_name
