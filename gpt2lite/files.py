"""Atomic file writes: a temporary file beside the target, renamed into place only once it is complete.

Every file gpt2lite saves (checkpoints, adapters, reports, tokenizer files) goes through `atomic_write`, so
a crash or a full disk never leaves half a file where a whole one was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Callable, Optional

logger = logging.getLogger(__name__)


def atomic_write(path: str, write: Callable[[str], None]):
    """Write through `write(tmp_path)` into a temporary file beside `path`, then rename it into place.

    `write` must close what it opens (pass a path-taking saver such as torch.save or safetensors' save_file,
    or use atomic_write_text). A failure leaves `path` as it was and removes the temporary file; a full disk
    says so. Temporary files of the same target left by a process killed mid-write are removed first.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=_temporary_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as error:
        disk_full = isinstance(error, Exception) and _out_of_space(error, directory)  # before tmp frees space
        if os.path.exists(tmp):
            os.remove(tmp)
        if disk_full:
            kept = "the previous file is unchanged" if os.path.exists(path) else "nothing was written"
            raise OSError(errno.ENOSPC, f"the disk is full (no space left on the device) while writing {path}; "
                                        f"{kept}. Free some space and save again", path) from error
        raise


def atomic_write_text(path: str, text: str, newline: Optional[str] = None):
    """Write `text` (UTF-8) to `path` atomically, closing the file before it is renamed into place."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline=newline) as f:
            f.write(text)

    atomic_write(path, write)


def _out_of_space(error: Exception, directory: str) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    # torch.save reports a full disk in its own words ("unexpected pos 704 vs 598"): look at the disk itself
    try:
        return shutil.disk_usage(directory).free < 2**20
    except OSError:
        return False


def _temporary_prefix(path: str) -> str:
    return "." + os.path.basename(path) + "."


def remove_stale_temporaries(path: str):
    """Delete the temporary files atomic_write left beside `path` when a process died while writing it."""
    directory, prefix = os.path.dirname(os.path.abspath(path)), _temporary_prefix(path)
    # mkstemp's random part is 8 letters, digits or underscores: no other target's temporaries match
    pattern = re.compile(re.escape(prefix) + r"[a-z0-9_]{8}\.tmp")
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if pattern.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):  # another process removed it first
                os.remove(os.path.join(directory, name))
            logger.info("removed %s, left by an interrupted save of %s", name, path)


def read_json_object(path: str, holds: str, fix: str) -> dict:
    """The JSON object in `path`, else CheckpointError naming the file: not valid JSON (or not UTF-8), or a
    JSON value that is not an object. holds: the message's end for that case, saying what the object should
    hold, e.g. 'not an object of adapter settings (...)';
    fix: what to do about a file that is not valid JSON."""
    from gpt2lite.errors import CheckpointError

    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); {fix}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, {holds}")
    return value
