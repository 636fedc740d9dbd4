"""Alice's side of the configuration, and the checks of a stream header's: outside f.

`load_config("configs/small.yaml", ["--trainer.max_steps", "200"])` reads the YAML with
``yaml.safe_load``, applies LightningCLI-style dotted overrides, and builds the dataclasses of
training/config.py, checking every key and value. Any problem raises `ConfigError` with the dotted
key, the value and what is allowed, so `prequel` can print one clear line instead of a traceback.
`config_from_dict` checks a stream header's settings the same way before Bob decodes with them.

Each field's limit is annotated on the field (``Annotated[int, POSITIVE]``) in training/config.py
and its ``# comment`` says what it means; `prequel --help` lists them from there. What is checked
here changes no decoded bit, so it is not part of f (prequel/program.py).
"""

import dataclasses
import difflib
import math
import os
import stat
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from prequel.alice.tokenizing import BPE_MAX_VOCAB
from prequel.checks.memory import check_memory, format_bytes
from prequel.models.gpt import GPTConfig
from prequel.resources import config_path
from prequel.training.config import (  # noqa: F401 (the schema, re-exported: the CLI's and tests' one import)
    _FLOAT,
    BELOW_ONE,
    MAX_THREADS,
    NON_NEGATIVE,
    POSITIVE,
    Config,
    ConfigError,
    DataConfig,
    Limit,
    mixture_members,
    program_dict,
    to_dict,
)

# Keys that are derived, not chosen: refusing them keeps one source of truth.
_DERIVED = {"model.vocab_size": "it is set by the tokenizer"}

# GPTConfig's limits. Its fields live in models/gpt.py, which cannot import Limit from here
# (this module imports it), so they are listed here and checked by the same code as the rest.
_MODEL_LIMITS = {
    "block_size": POSITIVE,
    "n_layer": POSITIVE,
    "n_head": POSITIVE,
    "n_embd": POSITIVE,
    "dropout": BELOW_ONE,
    "z_loss": NON_NEGATIVE,
    "ngram_order": Limit("in 0..6 (0 = off)", lambda v: 0 <= v <= 6),
    "ngram_hash_bits": Limit("in 8..24", lambda v: 8 <= v <= 24),
    "head_chunk": NON_NEGATIVE,
}


def field_types(cls: type) -> dict[str, Any]:
    """Each field's type, with its limits as ``Annotated`` metadata."""
    hints = typing.get_type_hints(cls, include_extras=True)
    if cls is GPTConfig:
        hints.update({name: Annotated[hints[name], limit] for name, limit in _MODEL_LIMITS.items()})
    return hints


def leaf_fields(cls: type = Config, prefix: str = ""):
    """(dotted key, dataclass field, type) of every settable key, section by section."""
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_fields(hints[f.name], f"{key}.")
        elif key not in _DERIVED:
            yield key, f, hints[f.name]


def limits_of(hint: Any) -> tuple[Limit, ...]:
    return (
        tuple(m for m in typing.get_args(hint)[1:] if isinstance(m, Limit))
        if typing.get_origin(hint) is Annotated
        else ()
    )


# The keys with the two common limits (tests check each one's message).
POSITIVE_KEYS = {key for key, _, hint in leaf_fields() if POSITIVE in limits_of(hint)}
NON_NEGATIVE_KEYS = {key for key, _, hint in leaf_fields() if NON_NEGATIVE in limits_of(hint)}


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Annotated:
        checked = _check_type(key, value, typing.get_args(hint)[0])
        for limit in limits_of(hint):
            if not limit.allows(checked):
                raise ConfigError(f"{key}: must be {limit.text}, got {value!r}")
        return checked
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not allowed")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        # 1e-3: YAML 1.1 reads a float without a dot as a string
        number = float(value) if isinstance(value, str) and _FLOAT.fullmatch(value.strip()) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(number)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {hint} for {key}")


def build_dataclass(cls: type, values: dict, prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if dotted in _DERIVED:
            raise ConfigError(f"{dotted} cannot be set: {_DERIVED[dotted]}")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown config key {dotted}{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build_dataclass(hint, value, f"{dotted}.")
        else:
            kwargs[key] = _check_type(dotted, value, hint)
    return cls(**kwargs)


def _validate(config: Config) -> None:
    """What no single field's limit can say: how fields depend on each other."""
    m = config.model
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    if m.positions == "rope" and (m.n_embd // m.n_head) % 2:
        raise ConfigError("model.positions: rope needs an even head size (n_embd / n_head)")
    if config.data.context >= m.block_size:
        raise ConfigError(
            f"data.context ({config.data.context}) must be less than model.block_size ({m.block_size}): "
            "chunks are block_size - context tokens long"
        )
    if config.data.context and config.stream.enabled and config.stream.procedure == "incremental":
        raise ConfigError(
            "data.context needs stream.procedure: full (the incremental coder's key/value-cache steps "
            "start each row at BOS, without the context)"
        )
    _validate_data(config.data)
    mixture_members(config)  # checks the members
    if m.head_chunk:
        clash = [
            f"{key}: {value}"
            for key, value in (
                ("model.ngram_order", m.ngram_order),
                ("model.z_loss", m.z_loss),
                ("mixture.members", config.mixture.members.strip()),
            )
            if value
        ]
        if clash:
            raise ConfigError(
                f"model.head_chunk (one GPT's logits, chunk by chunk) does not combine with {', '.join(clash)}: "
                "set model.head_chunk: 0 to use them"
            )
    if config.stream.enabled and m.dropout > 0:
        raise ConfigError("stream.enabled needs model.dropout: 0 (dropout masks are not replayable)")
    if config.stream.enabled and config.trainer.strategy == "ddp_spawn":
        raise ConfigError(
            "trainer.strategy: ddp_spawn cannot write a stream (it trains in new processes, and the "
            "stream they encode never comes back to the process that writes it); use trainer.strategy: ddp or auto"
        )
    check_memory(config)


def _validate_data(d: DataConfig) -> None:
    if d.tokenizer == "bytes":
        if d.vocab_size != 256:
            raise ConfigError(
                f"data.vocab_size: the bytes tokenizer has exactly 256 symbols, got {d.vocab_size} "
                "(use data.tokenizer: bpe for a larger vocabulary)"
            )
        if d.tokenizer_file is not None:
            raise ConfigError("data.tokenizer_file needs data.tokenizer: bpe")
    elif d.tokenizer_file is None and not 256 < d.vocab_size <= BPE_MAX_VOCAB:
        raise ConfigError(f"data.vocab_size: bpe needs 256 < vocab_size <= {BPE_MAX_VOCAB}, got {d.vocab_size}")


def config_from_dict(values: dict) -> Config:
    config = build_dataclass(Config, values)
    _validate(config)
    return config


def parse_overrides(args: list[str]) -> dict:
    """Turn ``["--a.b", "1", "--c=x"]`` into ``{"a": {"b": 1}, "c": "x"}`` (values via YAML)."""
    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected an option like --trainer.max_steps 200, got {arg!r}")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"option --{arg[2:]} needs a value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"option --{key} conflicts with another option")
        node[leaf] = value
    return tree


def merge_values(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge_values(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)
MAX_CONFIG_FILE_BYTES = 16 << 20  # no config file is this large


def regular_file_size(path: Path, what: str, max_bytes: int, why: str, error: type[Exception] = ConfigError) -> int:
    """The size of `path`, checked before anything reads it: it must be a regular file (a device
    such as /dev/zero or /dev/urandom never ends, a FIFO blocks, a directory is not a file) of at
    most `max_bytes` (`why` says where that limit comes from)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what}: file not found: {path}") from None
    except OSError as e:
        raise error(f"{what}: cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a file")
        raise error(f"{what}: {path} is {kind}, not a regular file; give a regular file")
    if info.st_size > max_bytes:
        raise error(
            f"{what}: {path} is {format_bytes(info.st_size)}, more than the {format_bytes(max_bytes)} allowed ({why})"
        )
    return info.st_size


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file's top-level mapping (`yaml.safe_load`), or a ConfigError naming what is wrong."""
    if not path.exists():
        raise ConfigError(f"{what} not found: {path}")
    regular_file_size(path, what, MAX_CONFIG_FILE_BYTES, "no config file is this large")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"{path}: expected a mapping of config keys at the top level, "
            f"got a {type(values).__name__}: {str(values)[:60]!r}"
        )
    return values


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    values: dict = {}
    if path is not None:
        path = config_path(path)
        values = read_yaml_mapping(path, "config file")
        values.setdefault("name", path.stem)
    values = merge_values(values, parse_overrides(overrides or []))
    config = build_dataclass(Config, values)
    _validate(config)
    return config


def dump_yaml(config: Config) -> str:
    """Canonical text of the program's settings, as |f| counts them."""
    return yaml.safe_dump(program_dict(config), sort_keys=True)


def counted_yaml(config: Config) -> str:
    """The settings |f| counts: those that differ from the defaults in f's dataclasses (Bob has
    those), as canonical YAML. data.path is left out: where Alice read the data is not needed to decode it."""
    values, defaults = program_dict(config), program_dict(Config())
    values["data"].pop("path")
    changed = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if v != defaults[key][k]}
        if value and value != defaults[key]:
            changed[key] = value
    return yaml.safe_dump(changed, sort_keys=True) if changed else ""
