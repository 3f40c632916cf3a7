"""Reading the text files a user hands atoll: configs, sys.yaml files, data files, traces.

Text is UTF-8 (a byte-order mark is skipped); anything else is refused with the line of the first
undecodable byte instead of being silently garbled. YAML is read in the YAML 1.2 core schema, so
``yes``/``no``/``on``/``off`` stay strings (YAML 1.1 made them booleans: ``name: no`` became
False), ``1e-3`` is a number and ``010`` is ten; a key given twice in one mapping is an error
instead of the last one silently winning. Every problem is one line naming the file and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from atoll.errors import AtollError, ConfigError


def read_text(path: str | Path, error: type[AtollError] = ConfigError, what: str = "file") -> str:
    """The text of ``path`` (UTF-8, BOM skipped); ``error`` for a directory, unreadable or non-UTF-8 file."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} '{path}' is a directory, not a file", "give the path of the file inside it")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} '{path}': {exc.strerror or exc}", "check the path and its permissions") from None
    return decode_utf8(data, path, error)


def decode_utf8(data: bytes, source: str | Path, error: type[AtollError] = ConfigError) -> str:
    """``data`` decoded as UTF-8 (BOM skipped); ``error`` naming the line of the first bad byte."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise error(f"'{source}' is UTF-16 text", "save it as UTF-8, e.g. iconv -f utf-16 -t utf-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(
            f"'{source}' is not UTF-8: byte 0x{data[exc.start]:02x} at line {line} is not valid UTF-8",
            "save it as UTF-8, e.g. from Latin-1: iconv -f latin1 -t utf-8",
        ) from None


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core scalars and no duplicate keys."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base class reports unhashable keys
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"key '{key}' is given twice (first at line {first_line[key] + 1})",
                        key_node.start_mark,
                    )
                first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    if body.startswith("0o"):
        return sign * int(body[2:], 8)
    if body.startswith("0x"):
        return sign * int(body[2:], 16)
    return sign * int(body, 10)


_CORE_TAGS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in _CORE_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def parse_yaml(text: str, source: str | Path, error: type[AtollError] = ConfigError, what: str = "") -> Any:
    """``text`` parsed as YAML 1.2 (see the module docstring); ``error`` naming line and problem."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        fix = "keep one of them" if "given twice" in problem else "indent with spaces, not tabs" if "'\\t'" in problem else "fix the syntax"
        raise error(f"{what + ' ' if what else ''}'{source}' is not valid YAML{where}: {problem}", fix) from None


def parse_yaml_value(text: str) -> Any:
    """One ``--set`` value as YAML 1.2 (the text itself when it is not valid YAML)."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506
    except yaml.YAMLError:
        return text
