"""User-facing errors: one line that names the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations


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
