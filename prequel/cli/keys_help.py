"""`--help` for config keys: every key with its type, default and meaning, read from the dataclasses.

A field's meaning is its ``# comment`` in the dataclass's source (training/config.py, models/gpt.py):
written once beside the field, and free in |f| (f is counted without comments). `Parser` is the
argparse parser every command uses.
"""

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal


class Parser(argparse.ArgumentParser):
    """An argparse parser that also accepts each flag's underscore spelling (--chunk_size for
    --chunk-size: older docs and scripts use it), and builds a callable epilog only when help
    is shown (the config keys' epilog reads the config source)."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        for i, arg in enumerate(args):
            name, eq, value = arg.partition("=")
            dashed = "--" + name[2:].replace("_", "-")
            if name.startswith("--") and dashed in self._option_string_actions:  # every spelling argparse knows
                args[i] = dashed + eq + value
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def _field_comments(cls: type) -> dict[str, str]:
    """Each field's ``# comment`` in its class's source (on its line, else the comment lines just
    above it): what the field means, written once beside it and free in |f| (comments are stripped)."""
    source = Path(inspect.getsourcefile(cls)).read_text()
    comments = {}  # line number -> (text, whether the comment is the whole line)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), not tok.line[: tok.start[1]].strip())
    (node,) = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == cls.__name__]
    meanings = {}
    for stmt in node.body:
        if not isinstance(stmt, ast.AnnAssign):
            continue
        text, whole_line = comments.get(stmt.end_lineno, ("", True))
        if whole_line:  # no comment after the field: the block above it, if any
            row, above = stmt.lineno - 1, []
            while comments.get(row, ("", False))[1]:
                above.insert(0, comments[row][0])
                row -= 1
            text = " ".join(above)
        meanings[stmt.target.id] = text
    return meanings


def _type_text(hint: Any) -> str:
    """A field's type as --help shows it: ``int > 0``, ``{bytes, bpe}``, ``str | null``."""
    from prequel.checks.settings import limits_of  # (imports torch: only when help is shown)

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return " ".join([_type_text(args[0]), *(limit.text for limit in limits_of(hint))])
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_text(a) for a in args)
    if origin is Literal:
        return "{" + ", ".join(map(str, args)) + "}"
    if origin in (tuple, list):
        return "list"
    return getattr(hint, "__name__", str(hint))


def _value_text(value: Any) -> str:
    """A default as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(map(_value_text, value)) + "]"
    return str(value)


def describe_keys(cls: type) -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, meaning) of every settable key of `cls`, section by section."""
    from prequel.checks.settings import field_types, leaf_fields

    rows, comments = [], {}
    for key, f, hint in leaf_fields(cls):
        owner = key.rpartition(".")[0]
        if owner not in comments:  # the class whose source holds this section's comments
            section = cls
            for part in filter(None, owner.split(".")):
                section = field_types(section)[part]
            comments[owner] = _field_comments(section)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((key, _type_text(hint), _value_text(default), comments[owner].get(f.name, "")))
    return rows


def keys_help(cls: type, title: str) -> str:
    """Every settable key of the dataclass `cls`, by section: type, default and the meaning its
    `# comment` gives, formatted as argparse formats flags."""
    keys = argparse.ArgumentParser(prog="", usage=argparse.SUPPRESS, add_help=False)  # only formats, never parses
    groups = {}
    for key, kind, default, meaning in describe_keys(cls):
        section = key.rpartition(".")[0]
        if section not in groups:
            groups[section] = keys.add_argument_group(f"{section}.*" if section else "top level")
        help_text = f"{meaning} (default: {default})" if meaning else f"default: {default}"
        groups[section].add_argument(f"--{key}", metavar=kind, help=help_text.replace("%", "%%"))
    return f"{title}\n\n{keys.format_help()}"
