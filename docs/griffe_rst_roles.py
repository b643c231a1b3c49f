"""Griffe extension for the API reference: Sphinx roles (:func:`x`) in docstrings render as code (`x`)."""
import re

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj):`~?([^`]+)`")


class RstRoles(griffe.Extension):
    def on_instance(self, *, obj, **kwargs):
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
