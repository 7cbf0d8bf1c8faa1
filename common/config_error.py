"""``ConfigError``, apart from config.py: the CLI catches it around every command, and a
command that never reads the mesh file must not import pydantic to do so."""

from __future__ import annotations


class ConfigError(Exception):
    """The mesh file is unusable; the message names the file and the key."""
