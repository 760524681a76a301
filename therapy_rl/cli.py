"""The command-line edge shared by ``main`` and ``chat``: ``run_cli(main)`` in place of ``absl.app.run(main)``.

A mistake on the command line (unknown flag, unknown ``--config.x`` field, unparsable value, missing config
file) and any ``errors.UserError`` the run raises print ONE line ``error: …`` on stderr and exit with status 2;
``errors.NonFiniteError`` exits with status 3. ``--debug`` (or ``THERAPY_RL_DEBUG=1``) prints the traceback first.
No jax here: the line comes out before the heavy imports.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags

from therapy_rl import errors

USER_ERROR_STATUS = 2
NONFINITE_STATUS = 3
DEBUG_ENV = "THERAPY_RL_DEBUG"
_TRUE = ("1", "true", "yes", "on")


def debug_requested(argv: Sequence[str]) -> bool:
    """``--debug`` on the command line (read before parsing, so a parse error can honour it) or the env var."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in _TRUE:
        return True
    wanted = False
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg in ("--debug", "-debug") or arg.lower() in ("--debug=true", "--debug=1"):
            wanted = True
        elif arg in ("--nodebug", "-nodebug") or arg.lower() in ("--debug=false", "--debug=0"):
            wanted = False
    return wanted


def one_line(text: str) -> str:
    """A message folded onto one line (inner lines joined with '; ')."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "; ".join(lines) or "(no message)"


def fail(message: Any, status: int = USER_ERROR_STATUS, debug: bool = False,
         cause: BaseException | None = None) -> NoReturn:
    """Prints ``error: <message>`` (after the traceback of ``cause`` or of the error being handled, when
    ``debug``) and exits with ``status``."""
    cause = cause or sys.exc_info()[1]
    if debug and cause is not None:
        traceback.print_exception(cause)
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(status)


def _unknown_field(err: Exception, argv: Sequence[str]) -> str:
    """ml_collections' KeyError/AttributeError for ``--config.a.b`` naming no field, as the override and a fix."""
    text = str(err).replace("\\'", "'").replace("\\n", " ")
    unknown = re.search(r"'(\w+)'", text)
    suggestion = re.search(r'Did you mean "(\w+)"', text)
    name = unknown.group(1) if unknown else text
    for arg in argv[1:]:
        match = re.match(r"^--?(?:no)?(\w+)\.([\w.]+)", arg)
        if match and name in match.group(2).split("."):
            flag, parts = match.group(1), match.group(2).split(".")
            where = f"--{flag}.{match.group(2)}"
            if suggestion:
                parts[parts.index(name)] = suggestion.group(1)
                return f"unknown config field {where}: did you mean --{flag}.{'.'.join(parts)}?"
            return f"unknown config field {where}: the config has no field {name!r} (--helpfull lists them)"
    hint = f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""
    return f"unknown config field {name!r}{hint}"


def _config_file_error(flag: str, err: BaseException) -> str:
    """config_flags' IOError (a missing or unreadable config file) as the flag, the file and a fix."""
    reason = [line.strip() for line in str(err).splitlines() if line.strip()][-1]
    return f"--{flag}: cannot load the config file ({reason}); pass a file such as --{flag}=configs/quickstart.py"


def describe_parse_error(err: Exception, argv: Sequence[str]) -> str:
    """One line for an exception raised while parsing flags (config files are loaded at parse time)."""
    if isinstance(err, flags.Error):
        text = one_line(err)
        required = re.search(r"Flag --(\w+) must have a value other than None", text)
        if required:
            return f"--{required.group(1)} is required: pass --{required.group(1)}=..."
        if isinstance(err, flags.UnrecognizedFlagError) and "Did you mean" not in text:
            text += " (--helpfull lists the flags)"
        return text
    if isinstance(err, (KeyError, AttributeError)):
        return _unknown_field(err, argv)
    if isinstance(err, OSError):
        return _config_file_error("config", err)
    last = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"--config={_flag_value('config', argv)}: get_config() failed: {type(err).__name__}: " \
           f"{last[-1] if last else ''}; fix the config file"


def _flag_value(name: str, argv: Sequence[str]) -> str:
    """The value given to ``--name`` on the command line (``--name=v`` or ``--name v``), or '?'."""
    for i, arg in enumerate(argv):
        if arg.startswith((f"--{name}=", f"-{name}=")):
            return arg.split("=", 1)[1]
        if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            return argv[i + 1]
    return "?"


def _unloaded_config_flag() -> tuple[str, BaseException] | None:
    """A config flag whose file could not be read holds an error object until used: (message, error) now."""
    for name in flags.FLAGS:
        value = flags.FLAGS[name].value
        if type(value).__name__ == "_ErrorConfig":  # ml_collections' placeholder for a failed load
            error = object.__getattribute__(value, "_error")
            return _config_file_error(name, error), error
    return None


def run_cli(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
    """``absl.app.run(main)`` with the errors a user causes shown as one line (see the module docstring)."""
    argv = list(sys.argv if argv is None else argv)
    if "debug" not in flags.FLAGS:
        flags.DEFINE_bool("debug", False, f"Show the traceback of an error (also {DEBUG_ENV}=1).")
    debug = debug_requested(argv)

    def parse(args: list[str]) -> list[str]:
        try:
            remaining = flags.FLAGS(args)
        except Exception as err:  # noqa: BLE001 - config files run user code at parse time
            fail(describe_parse_error(err, args), USER_ERROR_STATUS, debug)
        unloaded = _unloaded_config_flag()
        if unloaded:
            fail(unloaded[0], USER_ERROR_STATUS, debug, cause=unloaded[1])
        return remaining

    def guarded(args: list[str]) -> Any:
        try:
            return main(args)
        except errors.NonFiniteError as err:
            fail(err, NONFINITE_STATUS, debug)
        except (errors.UserError, app.UsageError) as err:
            fail(err, USER_ERROR_STATUS, debug)

    app.run(guarded, argv=argv, flags_parser=parse)
