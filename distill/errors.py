"""User-facing errors: one line that names the problem and the fix, exit code 2, no traceback.

Torch-free and import-free: the edge bundle ships this file beside its runtime.
"""

from __future__ import annotations

import sys


class UserError(RuntimeError):
    """An error caused by input or environment that the user can fix.

    ``python -m distill`` prints ``str(err)`` on one line and exits with code 2.
    The message must name what is wrong and how to fix it.
    """

    exit_code = 2


class MissingDataError(UserError):
    """A data package or file is absent. The message names the install command."""


class ExportCheckError(UserError):
    """An exported file failed its self-check (onnx.checker or parity with PyTorch)."""


def one_line(err: BaseException) -> str:
    """``Type: first line of the message``: an exception as it goes into a one-line error or a report."""
    msg = str(err).strip().splitlines()
    return f"{type(err).__name__}: {msg[0] if msg else ''}".strip()


def find_user_error(e: BaseException | None) -> UserError | None:
    """The UserError behind ``e``: Hydra's instantiate wraps errors raised by a ``_target_``
    (InstantiationException), and the user must see our one line, not Hydra's wrapper."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UserError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def report_user_error(user: BaseException) -> int:
    """Print a UserError as ``error: ...`` lines (a ConfigError has one line per problem) and return
    its exit code. A torchrun rank first leaves its process group, so it exits with that code rather
    than a gloo abort at interpreter teardown; looked up in sys.modules so this file imports no torch."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # leaving anyway: the error being reported matters more
            pass
    for line in str(user).splitlines() or [type(user).__name__]:
        print(f"error: {line}", file=sys.stderr)
    return int(getattr(user, "exit_code", 2))
