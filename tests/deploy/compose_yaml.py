"""Reading ``deploy/compose.yaml`` without PyYAML (not a dependency of the project).

The compose file keeps to a small part of YAML, and this reads exactly that part: block
mappings and block sequences by indentation, ``#`` comments, plain, single- and
double-quoted scalars, flow sequences written as JSON arrays, and one anchored mapping
merged with ``<<: *name``. Anything else raises :class:`UnreadYaml` naming the line, so
that an edit using more of YAML fails the compose test loudly instead of being misread;
where PyYAML is at hand, the test compares this reader's result with it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_INTEGER = re.compile(r"-?\d+")
_KEY = re.compile(r"(<<|[A-Za-z0-9_.-]+):(?:\s+(.*))?$")
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class UnreadYaml(ValueError):
    """The file uses YAML beyond what this reader reads."""


@dataclass(frozen=True)
class _Line:
    number: int
    indent: int
    text: str


def load(text: str) -> Any:
    lines = _lines(text)
    value, end = _Reader(lines).block(0, lines[0].indent if lines else 0)
    if end != len(lines):
        raise UnreadYaml(f"line {lines[end].number}: indentation does not fit its block")
    return value


def interpolate(value: str) -> str:
    """Compose's ``${NAME:-default}``, as it reads with ``NAME`` unset."""

    def default(match: re.Match[str]) -> str:
        if match.group(2) is None:
            raise UnreadYaml(f"{match.group(0)} has no default")
        return match.group(2)

    return _INTERPOLATION.sub(default, value)


def _lines(text: str) -> list[_Line]:
    found = []
    for number, raw in enumerate(text.splitlines(), 1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise UnreadYaml(f"line {number}: a tab in the indentation")
        content = _without_comment(raw).rstrip()
        if content.strip():
            found.append(_Line(number, len(content) - len(content.lstrip()), content.strip()))
    return found


def _without_comment(line: str) -> str:
    quote = ""
    for n, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (n == 0 or line[n - 1].isspace()):
            return line[:n]
    return line


class _Reader:
    def __init__(self, lines: list[_Line]) -> None:
        self.lines = lines
        self.anchors: dict[str, Any] = {}

    def block(self, start: int, indent: int) -> tuple[Any, int]:
        """The block whose lines begin at ``start`` with ``indent``; returns it and the
        index of the first line after it."""
        if self.lines[start].text.startswith("- ") or self.lines[start].text == "-":
            return self._sequence(start, indent)
        return self._mapping(start, indent)

    def _sequence(self, start: int, indent: int) -> tuple[list[Any], int]:
        items: list[Any] = []
        n = start
        while n < len(self.lines) and self.lines[n].indent == indent and self.lines[n].text.startswith("- "):
            line = self.lines[n]
            item = line.text[2:].strip()
            if _KEY.match(item) and not item.startswith(("'", '"')):
                raise UnreadYaml(f"line {line.number}: a mapping inside a sequence item")
            items.append(_scalar(item, line.number))
            n += 1
        return items, n

    def _mapping(self, start: int, indent: int) -> tuple[dict[str, Any], int]:
        mapping: dict[str, Any] = {}
        n = start
        while n < len(self.lines) and self.lines[n].indent == indent:
            line = self.lines[n]
            match = _KEY.match(line.text)
            if match is None:
                raise UnreadYaml(f"line {line.number}: not a `key: value` line")
            key, rest = match.group(1), (match.group(2) or "").strip()
            n += 1
            if key == "<<":
                if not rest.startswith("*") or rest[1:] not in self.anchors:
                    raise UnreadYaml(f"line {line.number}: a merge of something other than an anchor")
                for merged_key, merged in self.anchors[rest[1:]].items():
                    mapping.setdefault(merged_key, merged)
                continue
            anchor = ""
            if rest.startswith("&"):
                anchor, rest = rest[1:], ""
            if rest:
                value: Any = _scalar(rest, line.number)
            elif n < len(self.lines) and self.lines[n].indent > indent:
                value, n = self.block(n, self.lines[n].indent)
            elif (
                n < len(self.lines) and self.lines[n].indent == indent and self.lines[n].text.startswith("- ")
            ):
                value, n = self._sequence(n, indent)  # a sequence at its key's indentation
            else:
                value = None
            if anchor:
                if not isinstance(value, dict):
                    raise UnreadYaml(f"line {line.number}: an anchor on something other than a mapping")
                self.anchors[anchor] = value
            if key in mapping:
                raise UnreadYaml(f"line {line.number}: {key} given twice")
            mapping[key] = value
        if n < len(self.lines) and self.lines[n].indent > indent:
            raise UnreadYaml(f"line {self.lines[n].number}: indented more than its block")
        return mapping, n


def _scalar(text: str, number: int) -> Any:
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UnreadYaml(f"line {number}: a flow sequence that is not a JSON array") from exc
        if not all(isinstance(item, str) for item in value):
            raise UnreadYaml(f"line {number}: a flow sequence of other than strings")
        return value
    if text.startswith('"'):
        if "\\" in text or not text.endswith('"') or len(text) < 2:
            raise UnreadYaml(f"line {number}: a double-quoted string with escapes, or unclosed")
        return text[1:-1]
    if text.startswith("'"):
        if not text.endswith("'") or len(text) < 2:
            raise UnreadYaml(f"line {number}: an unclosed single-quoted string")
        return text[1:-1].replace("''", "'")
    if text[0] in "{&*!|>%@`":
        raise UnreadYaml(f"line {number}: {text[0]} starts YAML this reader does not read")
    if _INTEGER.fullmatch(text):
        return int(text)
    if text in ("true", "false"):
        return text == "true"
    if text in ("null", "~"):
        return None
    return text
