"""A deterministic JSON value that satisfies a JSON schema: the sim's tool arguments and
structured outputs.

Real models fill a tool's input schema or a structured-output schema with values drawn
from the conversation; the sim draws them from a seed (a digest of the conversation), so
the same request always gets the same value and clients' validation is exercised for
real. Supported: type (and type lists), const, enum, anyOf/oneOf (first non-null
variant), allOf (merged), $ref into $defs/definitions (recursion bounded by MAX_DEPTH),
nested objects and arrays, prefixItems, required, min/max for numbers, strings, arrays
and objects, multipleOf, uniqueItems, and common string formats. Not supported:
`pattern` (no regex inversion) and `not`.

The Anthropic SDK moves constraints its API does not enforce into the description, as
`{minimum: 1, maximum: 10}`; those hints are honoured too, because the SDK validates
the reply against the original, constrained type.
"""

from __future__ import annotations

import ast
import math
import random
import re
import uuid
from collections.abc import Mapping
from typing import Any

MAX_DEPTH = 6  # below this, only required properties and the shortest arrays
DEFAULT_ITEMS = 2
_HINT_KEYS = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "format",
    "minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
    "prefixItems", "uniqueItems",
})
_HINT_KEY = re.compile(r"(?:^|, )([A-Za-z]+): ")
_FORMATS = {
    "date-time": lambda r: f"2025-0{r.randint(1, 9)}-{r.randint(10, 28)}T{r.randint(10, 23)}:00:00Z",
    "date": lambda r: f"2025-0{r.randint(1, 9)}-{r.randint(10, 28)}",
    "time": lambda r: f"{r.randint(10, 23)}:{r.randint(10, 59)}:00",
    "duration": lambda r: f"PT{r.randint(1, 9)}H",
    "email": lambda r: f"sim.{r.randint(100, 999)}@example.com",
    "hostname": lambda r: f"sim-{r.randint(100, 999)}.example.com",
    "ipv4": lambda r: f"192.0.2.{r.randint(1, 254)}",
    "ipv6": lambda r: f"2001:db8::{r.randint(1, 0xFFFF):x}",
    "uri": lambda r: f"https://example.com/sim/{r.randint(100, 999)}",
    "uuid": lambda r: str(uuid.UUID(int=r.getrandbits(128), version=4)),
}


def fake_instance(schema: Mapping[str, Any] | bool, seed: str) -> Any:
    """A value valid against `schema`, the same for the same (schema, seed).

    Parameters: schema, a JSON schema (draft 2020-12 or 7 style, as SDKs emit them);
    seed, any string (the sim passes a digest of the conversation and the tool name).
    Returns: a JSON-serialisable value.
    """
    return _Faker(schema, random.Random(seed)).value(schema, "value", 0)


def description_hints(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Constraints the Anthropic SDK wrote into a description.

    Its transform_schema() appends the keywords it dropped as one line of
    `{key: value, ...}` with Python reprs (`{minItems: 2, prefixItems: [{'type':
    'integer'}]}`), after a blank line when there was a description.
    """
    description = schema.get("description")
    if not isinstance(description, str) or not description.endswith("}"):
        return {}
    start = description.rfind("\n\n{") + 2 if "\n\n{" in description else 0
    if description[start : start + 1] != "{":
        return {}
    parts = _HINT_KEY.split(description[start + 1 : -1])
    hints = {}
    for key, raw in zip(parts[1::2], parts[2::2], strict=True):
        if key in _HINT_KEYS:
            try:
                hints[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                hints[key] = raw  # a bare word, such as a format name
    return hints


class _Faker:
    def __init__(self, root: Mapping[str, Any] | bool, rng: random.Random) -> None:
        self.root = root if isinstance(root, Mapping) else {}
        self.rng = rng

    def value(self, schema: Mapping[str, Any] | bool, hint: str, depth: int) -> Any:
        if schema is True or schema == {}:
            return f"{hint}-{self.rng.randint(100, 999)}"
        if not isinstance(schema, Mapping):
            return None  # `false` admits nothing; null is the least wrong answer
        schema = self._resolved(schema)
        schema = description_hints(schema) | schema  # explicit keywords win over hints
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return self.rng.choice(list(schema["enum"]))
        for key in ("anyOf", "oneOf"):
            if schema.get(key):
                return self.value(_first_non_null(schema[key]), hint, depth)
        if schema.get("allOf"):
            return self.value(self._merged(schema), hint, depth)
        return self._typed(schema, _type_of(schema), hint, depth)

    def _resolved(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        """Follow local `$ref`s (`#`, `#/$defs/X`, `#/definitions/X`), keeping siblings."""
        seen = 0
        while isinstance(schema.get("$ref"), str) and seen < 32:
            target: Any = self.root
            for part in schema["$ref"].lstrip("#").strip("/").split("/"):
                if part:
                    target = target.get(part.replace("~1", "/").replace("~0", "~"), {})
            schema = {k: v for k, v in schema.items() if k != "$ref"} | dict(target)
            seen += 1
        return schema

    def _merged(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        """allOf folded into one schema: properties and required are unioned."""
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = self._resolved(part) if isinstance(part, Mapping) else {}
            for key, val in part.items():
                if key == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **val}
                elif key == "required":
                    merged["required"] = [*merged.get("required", []), *val]
                else:
                    merged.setdefault(key, val)
        return merged

    def _typed(self, schema: Mapping[str, Any], type_: str, hint: str, depth: int) -> Any:
        if type_ == "object":
            return self._object(schema, depth)
        if type_ == "array":
            return self._array(schema, hint, depth)
        if type_ == "integer":
            return self._integer(schema)
        if type_ == "number":
            return self._number(schema)
        if type_ == "boolean":
            return self.rng.random() < 0.5
        if type_ == "null":
            return None
        return self._string(schema, hint)

    def _object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        props: Mapping[str, Any] = schema.get("properties") or {}
        required = list(schema.get("required") or [])
        names = list(props) if depth < MAX_DEPTH else [n for n in props if n in required]
        names += [n for n in required if n not in names]
        out = {name: self.value(props.get(name, {"type": "string"}), name, depth + 1) for name in names}
        extra = schema.get("additionalProperties", True)
        n = 1
        while len(out) < schema.get("minProperties", 0) and extra is not False:
            out[f"field_{n}"] = self.value(extra if isinstance(extra, Mapping) else True, f"field_{n}", depth + 1)
            n += 1
        return out

    def _array(self, schema: Mapping[str, Any], hint: str, depth: int) -> list[Any]:
        prefix = list(schema.get("prefixItems") or [])
        low = max(schema.get("minItems", 0), len(prefix) if depth < MAX_DEPTH else 0)
        count = low if depth >= MAX_DEPTH else max(low, DEFAULT_ITEMS)
        count = min(count, schema.get("maxItems", count))
        items = schema.get("items", True)
        out: list[Any] = []
        for i in range(count):
            sub = prefix[i] if i < len(prefix) else items
            item = self.value(sub, hint, depth + 1)
            for _ in range(8):  # uniqueItems: redraw a few times, then accept
                if not schema.get("uniqueItems") or item not in out:
                    break
                item = self.value(sub, hint, depth + 1)
            out.append(item)
        return out

    def _integer(self, schema: Mapping[str, Any]) -> int:
        low, high = _bounds(schema, step=1)
        low, high = math.ceil(low), math.floor(high)
        step = schema.get("multipleOf")
        if isinstance(step, int) and step > 0:
            first, last = -(-low // step), high // step
            return step * self.rng.randint(first, max(first, last))
        return self.rng.randint(low, max(low, high))

    def _number(self, schema: Mapping[str, Any]) -> float | int:
        low, high = _bounds(schema, step=0.01)
        step = schema.get("multipleOf")
        if isinstance(step, (int, float)) and step > 0:
            first, last = int(-(-low // step)), int(high // step)
            return step * self.rng.randint(first, max(first, last))
        value = round(self.rng.uniform(low, max(low, high)), 2)
        return min(max(value, low), max(low, high))

    def _string(self, schema: Mapping[str, Any], hint: str) -> str:
        fmt = _FORMATS.get(schema.get("format", ""))
        text = fmt(self.rng) if fmt else f"{hint}-{self.rng.randint(100, 999)}"
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        if len(text) < low:
            text += "x" * (low - len(text))
        return text if high is None else text[:high]


def _first_non_null(variants: list[Any]) -> Any:
    for variant in variants:
        if not (isinstance(variant, Mapping) and variant.get("type") == "null"):
            return variant
    return variants[0]


def _type_of(schema: Mapping[str, Any]) -> str:
    """The declared type (first non-null of a list), else what the keywords imply."""
    declared = schema.get("type")
    if isinstance(declared, list):
        declared = next((t for t in declared if t != "null"), "null")
    if isinstance(declared, str):
        return declared
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    if "minimum" in schema or "maximum" in schema:
        return "number"
    return "string"


def _bounds(schema: Mapping[str, Any], step: float) -> tuple[float, float]:
    """Inclusive (low, high); one-sided bounds get a 100-wide range, none gets 1..100."""
    low = schema.get("minimum")
    high = schema.get("maximum")
    if isinstance(schema.get("exclusiveMinimum"), (int, float)):
        low = schema["exclusiveMinimum"] + step
    if isinstance(schema.get("exclusiveMaximum"), (int, float)):
        high = schema["exclusiveMaximum"] - step
    if low is None and high is None:
        return 1, 100
    if low is None:
        return high - 100, high
    if high is None:
        return low, low + 100
    return low, high
