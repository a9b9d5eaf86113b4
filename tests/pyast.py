"""``ast.parse`` for the tests that read source code (import contracts, the wheel's contents).

CPython 3.11 can fail an ``ast.parse`` with ``SystemError: AST constructor recursion
depth mismatch`` when the garbage collector runs during the AST's construction and a
finalizer runs Python code (python/cpython#106905; seen in CI when an asyncio task
left by an earlier test was collected there and its ``__del__`` logged). Collection is
held off for the few milliseconds of the parse, so the result does not depend on what
garbage earlier tests left.
"""

from __future__ import annotations

import ast
import gc


def parse(source: str | bytes) -> ast.Module:
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source)
    finally:
        if enabled:
            gc.enable()
