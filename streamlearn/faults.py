"""Test-only fault injection: crash the agent at a named point.

The fault tests start the agent with ``STREAMLEARN_FAULT=<point>:<n>`` and the
agent kills itself with SIGKILL the n-th time it reaches ``<point>`` (for
example ``checkpoint:before_commit:3``: inside the third checkpoint transaction,
after every model was written and before COMMIT). Without the variable no hook
is installed and nothing here runs.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable


def fault_hook(spec: str | None) -> Callable[[str], None] | None:
    """A hook for ``spec`` (``point:n``), or None when ``spec`` is empty.

    >>> fault_hook(None) is None
    True
    >>> fault_hook("checkpoint:before_commit:x")
    Traceback (most recent call last):
    ...
    ValueError: STREAMLEARN_FAULT must look like 'checkpoint:before_commit:3', got 'checkpoint:before_commit:x'
    """
    if not spec:
        return None
    point, _, count = spec.rpartition(":")
    if not point or not count.isdigit() or int(count) < 1:
        raise ValueError(f"STREAMLEARN_FAULT must look like 'checkpoint:before_commit:3', got {spec!r}")
    remaining = [int(count)]

    def hook(name: str) -> None:
        if name == point:
            remaining[0] -= 1
            if remaining[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)

    return hook
