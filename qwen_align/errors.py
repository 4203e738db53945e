"""Errors meant for the user: the CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input (recipe, data, flags). The message names the file, line or field and what would be right."""


class RecipeError(UserError):
    pass


class DataError(UserError):
    pass
