"""Errors a user causes (bad flag or value, missing file or data, wrong workdir, a busy or incompatible run).

``cli.run_cli`` (behind ``main`` and ``chat``) turns a ``UserError`` into one line ``error: …`` on stderr and exit
status 2, and a ``NonFiniteError`` into one line and status 3, with no traceback (set ``THERAPY_RL_DEBUG=1`` or
pass ``--debug`` to see it). The message names the thing and the fix.
Subclasses also derive from the built-in error a caller would expect (``ValueError``/``FileNotFoundError``),
so library code catching those keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message is shown as is."""


class ConfigError(UserError, ValueError):
    """A config field has a bad value, an unknown name, or conflicts with another field or the machine."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the config names does not exist or is not what it should be."""


class InputError(UserError, ValueError):
    """An input file (dataset, checkpoint, tokenizer) is malformed; the message names file, line and field."""


class RunBusyError(UserError, RuntimeError):
    """Another live process holds the workdir's lock."""


class IncompatibleResumeError(UserError, ValueError):
    """The config differs from the saved run's in a field that cannot change on resume."""


class NonFiniteError(RuntimeError):
    """A NaN or Inf appeared in a loss, gradient or reward: the run stops without saving it."""
