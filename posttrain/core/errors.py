"""The errors a user can cause, each printed by the CLI as one line (never a traceback).

Input: nothing. Output: the exception classes every layer raises for bad user input:
``ConfigError`` (a recipe or command-line value), ``BadInput`` (a data file, a model or
tokenizer folder that cannot be used), ``RecordError`` (one record of a data file; a
``BadInput``). Messages name the file and the row or key path.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names file and key path."""


class BadInput(ValueError):
    """Training data, a model or a tokenizer cannot be used; the message names the file/row/folder."""


class RecordError(BadInput):
    """A record failed validation; the message names the file and line/row."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, BadInput, FileNotFoundError)
