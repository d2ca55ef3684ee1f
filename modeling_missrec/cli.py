"""What the command-line entry points share: how they end on a user's mistake.

A user error (a bad flag value, a missing or malformed file: a `ValueError`, `FileNotFoundError`, ...
raised by this package or by the entry point itself) ends with one line on stderr, `error: <message>`, and
exit status 2, as `python -m modeling_missrec.convert` does. An error raised inside a library (torch,
transformers, ...) is not the user's to decode from one line: it keeps its traceback. `--debug` on the command
line, or `MISSREC_DEBUG=1`, shows the traceback of user errors too.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
_OURS = (str(Path(__file__).resolve().parent) + os.sep, str(Path(sys.argv[0]).resolve().parent) + os.sep)


def raised_here(error: BaseException) -> bool:
    """Whether the innermost frame of the error's traceback is code of this package or of the entry point."""
    traceback = error.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    filename = str(Path(traceback.tb_frame.f_code.co_filename).resolve())
    return filename.startswith(_OURS) and "site-packages" not in filename.removeprefix(_OURS[0])


def run_command(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> None:
    """Call `main(argv)`; a user error becomes one line on stderr and `SystemExit(2)` (see the module)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MISSREC_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
    except USER_ERRORS as error:
        if debug or not raised_here(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def configure_logging(disable_progress: bool = False) -> None:
    """Readable logs for the command-line entry points; transformers' save/load bars off when asked."""
    import transformers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if disable_progress:
        transformers.utils.logging.disable_progress_bar()
