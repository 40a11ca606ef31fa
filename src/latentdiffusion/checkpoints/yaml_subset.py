"""A small reader and writer for the YAML subset of CompVis inference configs (``v1-inference.yaml``).

PyYAML is not a dependency, and these files use little of YAML: block mappings and sequences by
indentation (sequence items may sit at their key's indentation), flow sequences ``[ 1, 2, 4 ]`` and
empty flow mappings, ``#`` comments, and plain or quoted scalars (ints, floats such as ``1.0e-04``,
YAML 1.1 booleans, null). Anchors, tags, multi-line strings and multiple documents are refused with a
ValueError naming the line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)")
_TRUE, _FALSE, _NULL = (
    ("true", "True", "TRUE", "yes", "Yes", "on", "On"),
    ("false", "False", "FALSE", "no", "No", "off", "Off"),
    ("null", "Null", "NULL", "~", ""),
)
_UNSUPPORTED = ("&", "*", "!", "|", ">", "{{")
_PLAIN_STRING = re.compile(r"[A-Za-z_/][\w.\-/]*")


@dataclass(frozen=True)
class _Line:
    number: int
    indent: int
    text: str


def parse_yaml(text: str) -> Any:
    """The value of a YAML document written in the subset above."""
    lines = _lines(text)
    if not lines:
        return None
    value, end = _block(lines, 0, lines[0].indent)
    if end != len(lines):
        raise ValueError(f"line {lines[end].number}: unexpected indentation")
    return value


def _lines(text: str) -> list[_Line]:
    out = []
    for number, raw in enumerate(text.splitlines(), start=1):
        content = _strip_comment(raw).rstrip()
        if not content.strip() or content.strip() in ("---", "..."):
            continue
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError(f"line {number}: tabs are not allowed for indentation")
        out.append(_Line(number, len(content) - len(content.lstrip()), content.strip()))
    return out


def _strip_comment(line: str) -> str:
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def _is_item(line: _Line) -> bool:
    return line.text == "-" or line.text.startswith("- ")


def _block(lines: list[_Line], i: int, indent: int) -> tuple[Any, int]:
    if _is_item(lines[i]):
        return _sequence(lines, i, indent)
    return _mapping(lines, i, indent)


def _mapping(lines: list[_Line], i: int, indent: int) -> tuple[dict[str, Any], int]:
    result: dict[str, Any] = {}
    while i < len(lines) and lines[i].indent == indent and not _is_item(lines[i]):
        key, rest = _split_key(lines[i])
        i += 1
        if rest:
            result[key] = _scalar_or_flow(rest, lines[i - 1].number)
        elif i < len(lines) and (
            lines[i].indent > indent or (lines[i].indent == indent and _is_item(lines[i]))
        ):
            result[key], i = _block(lines, i, lines[i].indent)
        else:
            result[key] = None
    return result, i


def _sequence(lines: list[_Line], i: int, indent: int) -> tuple[list[Any], int]:
    result = []
    while i < len(lines) and lines[i].indent == indent and _is_item(lines[i]):
        rest = lines[i].text[1:].strip()
        if not rest:
            if i + 1 < len(lines) and lines[i + 1].indent > indent:
                value, i = _block(lines, i + 1, lines[i + 1].indent)
            else:
                value, i = None, i + 1
        elif _looks_like_key(rest):  # "- key: value" opens a mapping indented past the dash
            inner = _Line(lines[i].number, indent + 2, rest)
            value, i = _mapping([*lines[:i], inner, *lines[i + 1 :]], i, indent + 2)
        else:
            value, i = _scalar_or_flow(rest, lines[i].number), i + 1
        result.append(value)
    return result, i


def _looks_like_key(text: str) -> bool:
    return not text.startswith(("[", "{", '"', "'")) and (": " in text or text.endswith(":"))


def _split_key(line: _Line) -> tuple[str, str]:
    match = re.match(r"""("[^"]*"|'[^']*'|[^:]+?)\s*:(\s+|$)(.*)""", line.text)
    if match is None:
        raise ValueError(f"line {line.number}: expected 'key: value', got {line.text!r}")
    return str(_scalar(match.group(1), line.number)), match.group(3).strip()


def _scalar_or_flow(text: str, number: int) -> Any:
    if text.startswith("["):
        value, end = _flow_list(text, 0, number)
        if text[end:].strip():
            raise ValueError(f"line {number}: unexpected text after ']'")
        return value
    if text == "{}":
        return {}
    return _scalar(text, number)


def _flow_list(text: str, i: int, number: int) -> tuple[list[Any], int]:
    """Parse ``[a, b, [c]]`` starting at text[i] == "["; return the list and the index after "]"."""
    items, i = [], i + 1
    while True:
        while i < len(text) and text[i] in " ,":
            i += 1
        if i >= len(text):
            raise ValueError(f"line {number}: unclosed '['")
        if text[i] == "]":
            return items, i + 1
        if text[i] == "[":
            item, i = _flow_list(text, i, number)
        else:
            end = _scalar_end(text, i)
            item, i = _scalar(text[i:end].strip(), number), end
        items.append(item)


def _scalar_end(text: str, i: int) -> int:
    if text[i] in "\"'":
        return text.index(text[i], i + 1) + 1
    end = i
    while end < len(text) and text[end] not in ",]":
        end += 1
    return end


def _scalar(text: str, number: int) -> Any:
    if text.startswith('"') and text.endswith('"') and len(text) > 1:
        return json.loads(text)
    if text.startswith("'") and text.endswith("'") and len(text) > 1:
        return text[1:-1].replace("''", "'")
    if text.startswith(_UNSUPPORTED):
        raise ValueError(f"line {number}: YAML feature not supported here: {text!r}")
    if text in _NULL:
        return None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(
            text.replace(".", "", 1) if text.lstrip("+-").startswith((".i", ".I", ".n", ".N")) else text
        )
    return text


def dump_yaml(value: Any, indent: int = 0) -> str:
    """Block-style YAML for nested dicts of scalars and scalar lists (which ``parse_yaml`` reads back)."""
    pad = " " * indent
    lines = []
    for key, item in value.items():
        if isinstance(item, dict) and item:
            lines.append(f"{pad}{key}:\n{dump_yaml(item, indent + 2)}")
        else:
            lines.append(f"{pad}{key}: {_dump_scalar(item)}\n")
    return "".join(lines)


def _dump_float(value: float) -> str:
    # YAML 1.1 readers (PyYAML) need a dot in the mantissa to see "1.0e-06" as a float
    mantissa, e, exponent = repr(value).partition("e")
    if e and "." not in mantissa:
        mantissa += ".0"
    return mantissa + e + exponent


def _dump_scalar(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_dump_scalar(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, float):
        return _dump_float(value)
    text = str(value)
    plain = _PLAIN_STRING.fullmatch(text) and _scalar(text, 0) == text
    return text if plain else json.dumps(text)
