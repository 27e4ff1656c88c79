"""Constraints as regular expressions: a JSON schema, a JSON object, a choice of strings.

    json_schema  -> outlines-core's ``build_regex_from_schema`` (a library builds it), after
                    nanoserve checks every keyword is one whose meaning that regex enforces
    json_object  -> a hand-written regex for any JSON object nested two levels deep
    choice       -> the strings, escaped, as alternatives

Why check keywords: a regex builder that does not know a keyword leaves it out silently
(``minimum``, ``multipleOf``, ``uniqueItems`` are not expressible), and the output would
then break the schema. A keyword nanoserve cannot enforce is refused with the path to it,
so a constrained answer always validates. ``oneOf`` is refused too: its regex is that of
``anyOf``, which lets an answer match two branches.
"""

from __future__ import annotations

import json
from typing import Any

from nanoserve.errors import InvalidSamplingParams

WHITESPACE = r"[ ]?"  # between JSON tokens, as outlines-core's default: at most one space
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly", "writeOnly"}
ENFORCED = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "allOf", "$ref", "$defs", "definitions", "minLength", "maxLength", "pattern", "format",
}  # fmt: skip
FORMATS = {"date", "time", "date-time", "uuid", "email", "uri"}
TYPES = {"object", "array", "string", "integer", "number", "boolean", "null"}

_STRING = r'"([^"\\\x00-\x1F\x7F-\x9F]|\\["\\/bfnrt])*"'
_NUMBER = r"(-)?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?"
_SCALAR = rf"({_STRING}|{_NUMBER}|true|false|null)"


def _object(value: str) -> str:
    member = rf"{_STRING}{WHITESPACE}:{WHITESPACE}{value}"
    return rf"\{{{WHITESPACE}({member}({WHITESPACE},{WHITESPACE}{member})*)?{WHITESPACE}\}}"


def _array(value: str) -> str:
    return rf"\[{WHITESPACE}({value}({WHITESPACE},{WHITESPACE}{value})*)?{WHITESPACE}\]"


JSON_OBJECT_REGEX = _object(rf"({_SCALAR}|{_object(_SCALAR)}|{_array(_SCALAR)})")
"""Any JSON object whose values are scalars, or objects / arrays of scalars (two levels).

The regex of *every* JSON value (outlines-core's, for ``{"type": "object"}``) has ~1500
DFA states and takes seconds to build; two levels cover what ``json_object`` is used for.
"""

ANY_JSON_REGEX = rf"({_SCALAR}|{JSON_OBJECT_REGEX}|{_array(rf'({_SCALAR}|{_object(_SCALAR)}|{_array(_SCALAR)})')})"
"""Any JSON value, containers two levels deep (the schema ``{}`` or ``true``)."""

_REGEX_SPECIALS = set(".^$*+?()[]{}|\\/-")


def choice_regex(choices: list[str]) -> str:
    """A regex matching exactly one of ``choices`` (every regex metacharacter escaped)."""
    return "|".join("".join("\\" + c if c in _REGEX_SPECIALS else c for c in s) for s in choices)


def check_schema(schema: Any, path: str = "") -> None:
    """Raise InvalidSamplingParams naming the first keyword whose meaning nanoserve cannot enforce."""

    def fail(why: str) -> None:
        raise InvalidSamplingParams(f"invalid json_schema={_short(schema)}: {why}")

    if isinstance(schema, bool):
        if not schema:
            fail(f"the schema at {path or '/'} is false: no value matches it (the constraint is unsatisfiable)")
        return
    if not isinstance(schema, dict):
        fail(f"the schema at {path or '/'} must be an object, got {type(schema).__name__}")
    for key, value in schema.items():
        where = f"{path}/{key}"
        if key in ANNOTATIONS:
            continue
        if key not in ENFORCED:
            hint = " (use anyOf)" if key == "oneOf" else ""
            fail(f"unsupported schema keyword {key!r} at {where}{hint}; supported: {', '.join(sorted(ENFORCED))}")
        if key == "type":
            types = value if isinstance(value, list) else [value]
            bad = [t for t in types if t not in TYPES]
            if bad or not types:
                fail(f"unknown type {bad[0] if bad else value!r} at {where}")
        elif key == "format" and value not in FORMATS:
            fail(f"unsupported string format {value!r} at {where}; supported: {', '.join(sorted(FORMATS))}")
        elif key in ("properties", "$defs", "definitions"):
            if not isinstance(value, dict):
                fail(f"{where} must be an object")
            for name, sub in value.items():
                check_schema(sub, f"{where}/{name}")
        elif key in ("anyOf", "allOf", "prefixItems"):
            if not isinstance(value, list) or not value:
                fail(f"{where} must be a non-empty list of schemas")
            if key == "allOf" and len(value) > 1:
                fail(f"allOf with more than one schema at {where} is not supported; merge them into one")
            for i, sub in enumerate(value):
                check_schema(sub, f"{where}/{i}")
        elif key in ("items", "additionalProperties") and not isinstance(value, bool):
            check_schema(value, where)
        elif key in ("minItems", "maxItems", "minLength", "maxLength") and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            fail(f"{where} must be an integer >= 0")
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    if high is not None and low > high:
        fail(f"minLength {low} > maxLength {high} at {path or '/'} (the constraint is unsatisfiable)")
    low, high = schema.get("minItems", 0), schema.get("maxItems")
    if high is not None and low > high:
        fail(f"minItems {low} > maxItems {high} at {path or '/'} (the constraint is unsatisfiable)")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        fail(f"enum at {path or '/'} must be a non-empty list")


def schema_regex(schema: Any) -> str:
    """The regex of a JSON schema (a dict, or its JSON text); InvalidSamplingParams if refused."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidSamplingParams(f"invalid json_schema={_short(schema)}: not valid JSON ({exc})") from None
    check_schema(schema)
    if schema is True or schema == {}:
        return ANY_JSON_REGEX
    if schema == {"type": "object"}:
        return JSON_OBJECT_REGEX
    from outlines_core.json_schema import build_regex_from_schema  # lazy: only constrained requests need it

    try:
        return build_regex_from_schema(json.dumps(schema), whitespace_pattern=WHITESPACE)
    except Exception as exc:  # the builder's own refusals (bad $ref, ...), as the user's error
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidSamplingParams(f"invalid json_schema={_short(schema)}: {message}") from None



def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
