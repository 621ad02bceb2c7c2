"""How the command line reports an error: the library's own errors as one message line and exit status 2.

The library's own errors are DataError and CheckpointError wherever they are raised, and the ValueError,
TypeError, ImportError and FileNotFoundError that gpt2lite's code raises itself (a `raise` statement in the
gpt2lite package: config validation, a missing optional package), also when jsonargparse wraps one raised
while it builds a dataclass from the flags (it re-raises it as the __cause__ of its own ValueError). Any other
exception is unexpected and keeps its traceback. `--debug` (anywhere on the command line) or GPT2LITE_DEBUG=1
shows the traceback of every error.
"""

from __future__ import annotations

import linecache
import os
import sys
import traceback
from typing import List, Optional, Tuple

from gpt2lite.errors import CheckpointError, DataError

DEBUG_FLAG = "--debug"
DEBUG_VARIABLE = "GPT2LITE_DEBUG"
USAGE_ERROR = 2  # argparse's exit status for a bad command line; also that of bad data and settings
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAISED_BY_THE_LIBRARY = (ValueError, TypeError, ImportError, FileNotFoundError)


def debug_requested(argv: List[str]) -> Tuple[bool, List[str]]:
    """(whether tracebacks are wanted, argv without --debug): --debug anywhere, or GPT2LITE_DEBUG=1/true/yes."""
    wanted = os.environ.get(DEBUG_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")
    return wanted or DEBUG_FLAG in argv, [arg for arg in argv if arg != DEBUG_FLAG]


def library_error(error: BaseException) -> Optional[BaseException]:
    """The library's own error behind `error` (itself or one of its causes), or None when it is unexpected."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (DataError, CheckpointError)):
            return error
        if isinstance(error, RAISED_BY_THE_LIBRARY) and _raised_in_gpt2lite(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def _raised_in_gpt2lite(error: BaseException) -> bool:
    """Whether the innermost frame of the error's traceback is a `raise` statement in the gpt2lite package."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    innermost = frames[-1]
    inside = os.path.abspath(innermost.filename).startswith(PACKAGE_DIR + os.sep)
    return inside and linecache.getline(innermost.filename, innermost.lineno).lstrip().startswith("raise")


def message_line(error: BaseException) -> str:
    """`gpt2lite: error: <message>` on one line (a message's own line breaks become spaces)."""
    return "gpt2lite: error: " + " ".join(str(error).split())


def report_errors(run, argv: List[str]) -> int:
    """Call run(argv without --debug); 0 when it returns, USAGE_ERROR with one line on stderr for the
    library's own errors (the traceback too when debugging); unexpected exceptions propagate."""
    debug, argv = debug_requested(argv)
    try:
        run(argv)
    except Exception as error:  # noqa: BLE001: sorted into the library's own errors and unexpected ones below
        own = library_error(error)
        if own is None:
            raise
        if debug:
            traceback.print_exception(error)
        print(message_line(own), file=sys.stderr, flush=True)
        return USAGE_ERROR
    return 0
