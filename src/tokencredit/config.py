"""Typed configuration: one dataclass per command, read from readable YAML plus ``key=value`` overrides.

Precedence, lowest first: the dataclass defaults, the ``base`` dict a command embeds, the YAML file, then
``key=value`` overrides from the command line. Every key is checked against the dataclass fields and every
value against the field's type, so a typo fails at startup with a suggestion instead of hours into a run.

Dataclasses must be defined at module level: field types are resolved with ``typing.get_type_hints``
(needed for ``from __future__ import annotations``), which cannot see names local to a function.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import io
import re
import textwrap
import tokenize
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from tokencredit.run_folders import claim_run_folder
from tokencredit.runs import atomic_write_text

T = TypeVar("T")

COMMAND_LINE = "the command line"
BASE = "built-in defaults"


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message is meant for the person running it."""


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: dict | None = None,
) -> T:
    """Build ``cls`` from its defaults, then ``base``, then the YAML file at ``path``, then overrides."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    if isinstance(overrides, str):
        # A lone string would otherwise be iterated character by character.
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    values: dict[str, Any] = {}
    if base:
        _apply_mapping(cls, values, base, BASE)
    if path is not None:
        _apply_mapping(cls, values, _read_yaml(Path(path)), str(path))
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"Override {item!r} from {COMMAND_LINE} is not key=value (e.g. learning_rate=1e-5)"
            )
        _set(cls, values, key.split("."), _parse_value(text), COMMAND_LINE, raw=text)
    return _build(cls, values)


def config_to_dict(cfg: Any) -> dict:
    """Return ``cfg`` as plain dicts, lists and scalars (paths as str), ready for YAML or JSON."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {cfg!r}")
    return _plain(cfg)


def config_defaults(cfg: Any) -> dict:
    """The declared default of every init field of ``cfg``'s dataclass that has one, as plain values (nested
    dataclass sections as dicts); fields without a default are left out. A class's ``BEHAVIOUR_BEFORE_ADDED``
    (field -> value) overrides these: the value that reproduces what runs saved before the field existed did."""
    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"config_defaults needs a dataclass, got {cfg!r}")
    out = {}
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = _plain(f.default_factory())
    out.update(_plain(getattr(cfg, "BEHAVIOUR_BEFORE_ADDED", {})))
    return out


def claim_folder_for(cfg: Any, run_dir: str | Path) -> Callable[[], None]:
    """:func:`tokencredit.run_folders.claim_run_folder` for a config with ``resume``, ``overwrite`` and
    ``allow_changed_settings`` fields: its settings are the config, and a setting an older run lacks is checked
    against :func:`config_defaults` (so every caller judges old runs the same way)."""
    return claim_run_folder(run_dir, config_to_dict(cfg), cfg.resume, cfg.overwrite, cfg.allow_changed_settings,
                            defaults=config_defaults(type(cfg)))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as readable YAML (fields in declaration order), atomically."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True, default_flow_style=False)
    atomic_write_text(path, text)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"Config file {path} does not exist") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from exc
    if data is None:  # an empty file or one holding only comments
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file {path} must be a mapping of 'key: value' lines, not a {type(data).__name__}"
        )
    return data


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # e.g. "a: b" as a value; the type check below decides whether a string is acceptable


def _field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _section_class(tp: Any) -> type | None:
    """Return the dataclass inside ``tp`` (``Lora`` or ``Lora | None``), or None for a plain field."""
    candidates = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    for arg in candidates:
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def _check_key(cls: type, key: str, source: str, prefix: str) -> None:
    names = list(_field_types(cls))
    if key in names:
        return
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    valid = ", ".join(prefix + name for name in names)
    raise ConfigError(f"Unknown key '{prefix}{key}' from {source}.{hint} Valid keys: {valid}")


def _apply_mapping(
    cls: type, values: dict[str, Any], mapping: Mapping, source: str, prefix: str = ""
) -> None:
    for key, value in mapping.items():
        _set(cls, values, [str(key)], value, source, prefix=prefix)


def _set(
    cls: type,
    values: dict[str, Any],
    key_path: list[str],
    value: Any,
    source: str,
    raw: str | None = None,
    prefix: str = "",
) -> None:
    key = key_path[0]
    _check_key(cls, key, source, prefix)
    tp = _field_types(cls)[key]
    name = prefix + key
    section_cls = _section_class(tp)
    if len(key_path) > 1 or (section_cls is not None and isinstance(value, Mapping)):
        if section_cls is None:
            raise ConfigError(
                f"'{name}' from {source} has type {_describe(tp)}, not a section, so it has no sub-keys"
            )
        section = _open_section(cls, values, key)
        if len(key_path) > 1:
            _set(section_cls, section, key_path[1:], value, source, raw, name + ".")
        else:
            _apply_mapping(section_cls, section, value, source, name + ".")
        return
    try:
        values[key] = _coerce(value, tp, name, source)
    except ConfigError as error:
        # YAML turns `run_name=2024` into an int and `tag=yes` into a bool; the typed text is what was meant.
        if raw is None or isinstance(value, str):
            raise
        try:
            values[key] = _coerce(raw, tp, name, source)
        except ConfigError:
            raise error from None


def _open_section(cls: type, values: dict[str, Any], key: str) -> dict[str, Any]:
    """Return the pending values of nested dataclass field ``key``, starting from its current value."""
    current = values[key] if key in values else _default(cls, key)
    if isinstance(current, dict):
        section = current
    elif dataclasses.is_dataclass(current):
        section = {f.name: getattr(current, f.name) for f in dataclasses.fields(current) if f.init}
    else:
        section = {}  # None or no default: setting one sub-key brings in the section's own defaults
    values[key] = section
    return section


def _default(cls: type, key: str) -> Any:
    field = next(f for f in dataclasses.fields(cls) if f.name == key)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _build(cls: type[T], values: dict[str, Any]) -> T:
    kwargs = dict(values)
    for key, tp in _field_types(cls).items():
        section_cls = _section_class(tp)
        if section_cls is not None and isinstance(kwargs.get(key), dict):
            kwargs[key] = _build(section_cls, kwargs[key])
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs and _is_required(f)]
    if missing:
        raise ConfigError(f"Missing required key(s) for {cls.__name__}: {', '.join(missing)}")
    cfg = cls(**kwargs)
    if callable(getattr(cfg, "validate", None)):
        cfg.validate()
    return cfg


def _is_required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _coerce(value: Any, tp: Any, name: str, source: str) -> Any:
    """Return ``value`` checked against (and, where lossless, converted to) type ``tp``."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name, source)
            except ConfigError:
                continue
        raise _type_error(value, tp, name, source)
    if origin is Literal:
        for allowed in args:
            # type() as well as ==, so that True is not taken for 1 nor 1 for 1.0.
            if value == allowed and type(value) is type(allowed):
                return allowed
        raise _type_error(value, tp, name, source)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, name, source)
        item_tp = args[0] if args else Any
        return [_coerce(item, item_tp, f"{name}[{i}]", source) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(value, tp, name, source)
        value_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, value_tp, f"{name}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-5` (no dot) as a string, and that is how people write learning rates.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, (str, PurePath)):
            return Path(value)
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _type_error(value, tp, name, source)


def _type_error(value: Any, tp: Any, name: str, source: str) -> ConfigError:
    return ConfigError(f"'{name}' from {source} must be {_describe(tp)} (got {value!r})")


def _describe(tp: Any) -> str:
    """Return a short human name for a type, e.g. ``list[float]``, ``int | None``, ``one of 'a', 'b'``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _describe(a) for a in args)
    if origin is not None:
        inner = ", ".join(_describe(a) for a in args)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    return getattr(tp, "__name__", repr(tp))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Only init fields: those are the keys load_config accepts, so a saved config loads back.
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def import_object(spec: str, what: str = "reward") -> object:
    """Import "package.module:name" or "path/to/file.py:name" (running that code: it is trusted, see SECURITY.md).

    ``what`` names the setting in errors (``reward``, ``gold_scorer``).
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} {spec!r} must look like 'package.module:name' or 'file.py:name'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"{what} file {path} does not exist")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"cannot import {module_name!r} for {what} {spec!r}: {exc}") from exc
    if not hasattr(module, attr):
        raise ConfigError(f"{module_name} has no {attr!r} ({what} {spec!r})")
    return getattr(module, attr)


# ---------------------------------------------------------------------- help text from the dataclasses
_SECTION_RULE = re.compile(r"^-{2,}.*-{2,}$")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's description, read from the class source: its trailing ``# comment``, else the comment lines
    right above it (section rules such as ``# --- run ---`` excluded). Inherited fields come from their class."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    """field_docs of the fields declared in ``cls`` itself."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    body = ast.parse(source).body[0]
    out: dict[str, str] = {}
    for node in getattr(body, "body", []):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = comments.get(node.end_lineno, "") if node.end_lineno in code_lines else ""
        if not text:
            above, line = [], node.lineno - 1
            while line in comments and line not in code_lines and not _SECTION_RULE.match(comments[line]):
                above.insert(0, comments[line])
                line -= 1
            text = " ".join(above)
        out[node.target.id] = text
    return out


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) of every settable field, nested sections as ``section.field``."""
    docs = field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _field_types(cls)[f.name]
        section = _section_class(tp)
        default = _default(cls, f.name)
        if section is not None and (default is None or dataclasses.is_dataclass(default)):
            rows.append((prefix + f.name, _describe(tp), repr(_plain(default)), docs.get(f.name, "")))
            rows += describe_fields(section, prefix=f"{prefix}{f.name}.")
            continue
        rows.append((prefix + f.name, _describe(tp), repr(_plain(default)), docs.get(f.name, "")))
    return rows


def format_fields(cls: type, width: int = 100) -> str:
    """The settable fields of a config class as help text: ``key=VALUE  type, default D: description``."""
    lines = [f"settings ({cls.__name__}; give them as key=value, or in a YAML file with --config):"]
    for key, tp, default, doc in describe_fields(cls):
        lines.append(f"  {key}  ({tp}; default {default})")
        if doc:
            lines += textwrap.wrap(doc, width=width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)
