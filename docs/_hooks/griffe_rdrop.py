"""A Griffe extension for the API reference: reads this project's docstrings as written.

The docstrings are Google style with two reST habits, and the source stays as it is:

- an ``Example:`` section is read as Griffe's ``Examples:`` (doctests become code blocks);
- the reST roles ``:func:`x```, ``:class:`x```, ``:meth:`x``` and ``:mod:`x``` become
  inline code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`~?([^`]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


def rewrite(text: str) -> str:
    text = _EXAMPLE.sub(r"\1Examples:", text)
    return _ROLE.sub(r"`\1`", text)


class RDropDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
