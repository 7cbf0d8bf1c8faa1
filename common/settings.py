"""Policy settings changed at run time: an overlay file beside the mesh file.

``mesh.toml``'s ``[policy]`` is the base; ``mesh.overlay.toml`` beside it (or, where the
mesh file's directory cannot be written, ``<home>/policy.overlay.toml``) holds the
numbers an operator changed from the web UI or the API. The overlay is validated by the
same pydantic model as the mesh file (strict types, finite, bounded above), applied on top
of it at load time, and shown as such in `tron status`. A bad overlay is refused with the
file and key named.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tron.common.config import ConfigError, MeshConfig, Policy
from tron.common.models import validation_messages

OVERLAY_NAME = "mesh.overlay.toml"


def overlay_path(config_path: Path | None, home_root: Path) -> Path:
    if config_path is not None and os.access(config_path.parent, os.W_OK):
        return config_path.with_name(config_path.stem + ".overlay.toml")
    return home_root / "policy.overlay.toml"


def read_overlay(path: Path) -> dict[str, Any]:
    """The overlay's policy numbers ({} when there is none)."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    unknown = set(data) - {"policy"}
    if unknown:
        raise ConfigError(f"{path}: only [policy] may be overlaid, not {sorted(unknown)}")
    policy = data.get("policy", {})
    if not isinstance(policy, dict):  # `policy = 3`: once a TypeError from set(policy), not a message
        raise ConfigError(f"{path}: policy must be a table ([policy]), not {type(policy).__name__}")
    bad = set(policy) - set(Policy.model_fields)
    if bad:
        raise ConfigError(f"{path}: policy.{sorted(bad)[0]}: unknown key")
    return policy


def field_errors(err: ValidationError) -> dict[str, str]:
    """{field: message} for a form: each error next to its field."""
    out: dict[str, str] = {}
    for where, what in validation_messages(err, unknown="unknown setting"):
        out.setdefault(where or "policy", what)
    return out


def merged_policy(base: Policy, changes: dict[str, Any]) -> Policy:
    """``base`` with ``changes`` on top, validated as a whole by the mesh file's own model.

    Raises ValidationError, each error naming its field, for an unknown key, a value of
    the wrong type ("600" is no number, true no count, 3.0 no count), inf or nan, and a
    number past its bound (Policy's docstring lists them): what is refused here is
    refused in mesh.toml too, and no overlay can hold what the next daemon would refuse.
    """
    return Policy.model_validate({**base.model_dump(), **changes})


def apply_overlay(config: MeshConfig, overlay: dict[str, Any], source: Path) -> MeshConfig:
    if not overlay:
        return config
    try:
        return config.model_copy(update={"policy": merged_policy(config.policy, overlay)})
    except ValidationError as err:
        first = next(iter(field_errors(err).items()))
        raise ConfigError(f"{source}: policy.{first[0]}: {first[1]}") from None


def write_overlay(path: Path, values: dict[str, Any]) -> None:
    """Atomically, so a daemon killed mid-write leaves the old overlay or the new one."""
    lines = ["# Policy settings changed at run time (web UI / PUT /settings); mesh.toml is the base.",
             "[policy]"]
    for key in sorted(values):
        value = values[key]
        lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else repr(value)}")
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: the old overlay stands, no half-written file stays
        raise
