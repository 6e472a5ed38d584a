"""Settings: resolving every command's settings from defaults, persllm.toml, the environment and flags.

Precedence, lowest to highest, in one function (`resolve`):
built-in defaults < `[section]` of persllm.toml < `PERSLLM_<SECTION>_<KEY>` environment variables
< command-line flags. Paths from defaults and persllm.toml resolve against the project root; paths
from the environment or the command line resolve against the current directory, like any CLI.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar

from persllm_cli.core import console
from persllm_cli.core.errors import EXIT_ERROR, EXIT_USAGE, PersllmError
from persllm_cli.core.project import PROJECT_FILE, Project

T = TypeVar("T")


SECRET_NAMES = ("key", "api_key", "token", "secret", "password")
SECRET_SUFFIXES = ("_key", "_token", "_secret", "_password")


def is_secret_name(name: str) -> bool:
    """Setting names that may hold a credential (never written to sidecars or run.json)."""
    n = name.lower()
    return n in SECRET_NAMES or n.endswith(SECRET_SUFFIXES)


def _base_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _coerce(value: Any, tp: Any, name: str, origin: str) -> Any:
    base = _base_type(tp)
    if value is None:
        return None
    try:
        if typing.get_origin(base) is list:
            (inner,) = typing.get_args(base) or (str,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            return [_coerce(v, inner, name, origin) for v in value]
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base is int:
            # true/false and 2.5 are not counts: say so rather than use 1 or 2.
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if base is Path:
            return Path(value).expanduser()
        if base is str:
            return str(value)
        if typing.get_origin(base) is dict or base is dict:
            if not isinstance(value, dict):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise PersllmError(f"{origin}: {name} = {value!r} is not a valid {getattr(base, '__name__', base)}") from None
    return value


def setting(default: Any, *, help: str = "", **rules: Any) -> Any:
    """A settings field with its help and the values it may take, checked by `resolve` wherever a
    value comes from: at_least, more_than, at_most, less_than (numbers; None always passes) and
    choices. The CLI shows the help with the real default (`help_text`), so both are written once.

        concurrency: int = setting(8, at_least=1, help="Requests in flight at once.")
    """
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"rules": rules, "help": help})
    return field(default=default, metadata={"rules": rules, "help": help})


def _shown(value: Any) -> str:
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def help_text(cls: type, name: str, *, flag: str | None = None) -> str:
    """The help of setting `name` of `cls`, ending in its real default ("[default: 8]").

    A bool shown as `--x/--no-x` states its default as the flag that is on; a default of None or
    an empty list states nothing (the help says what happens then)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    text = f.metadata.get("help", "")
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
    else:
        default = None
    if default is None or default == [] or default == {}:
        return text
    if isinstance(default, bool):
        if not flag or "/" not in flag:
            return text
        on, off = flag.split("/")
        shown = (on if default else off).lstrip("-")
    else:
        shown = _shown(default)
    return f"{text} [default: {shown}]".strip()


_RULE_WORDS = {"at_least": "at least", "more_than": "more than", "at_most": "at most", "less_than": "less than"}


def _breaks(value: Any, rules: dict[str, Any]) -> str | None:
    """What `value` should be, when it breaks one of `rules`; None when it keeps them all."""
    if value is None or not rules:
        return None
    if "choices" in rules:
        return None if value in rules["choices"] else f"one of {', '.join(map(str, rules['choices']))}"
    holds = {"at_least": operator.ge, "more_than": operator.gt, "at_most": operator.le, "less_than": operator.lt}
    if all(holds[k](value, bound) for k, bound in rules.items()):
        return None
    return " and ".join(f"{words} {rules[k]}" for k, words in _RULE_WORDS.items() if k in rules)


def env_name(section: str, key: str) -> str:
    return f"PERSLLM_{section}_{key}".upper().replace("-", "_")


def resolve(cls: type[T], section: str, flags: dict[str, Any], project: Project | None) -> T:
    """Build settings `cls` (a dataclass) for one command.

    defaults (the dataclass's) < persllm.toml [section] < PERSLLM_SECTION_KEY < flags that are not None.
    Relative paths from defaults or the toml resolve against the project root; those from the
    environment or flags against the current directory. Unknown toml keys are an error (a typo
    in a setting should not be silently ignored).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    toml_section = project.section(section) if project else {}
    toml_path = project.root / PROJECT_FILE if project else None
    unknown = sorted(k for k in toml_section if k.replace("-", "_") not in fields)
    if unknown:
        raise PersllmError(f"{toml_path}: unknown setting(s) in [{section}]: {', '.join(unknown)} "
                           f"(known: {', '.join(sorted(fields))})")
    prefix = env_name(section, "")
    for var in sorted(os.environ):
        if var.startswith(prefix) and var[len(prefix):].lower() not in fields:
            console.warn(f"{var} is not a setting of [{section}]; ignored (known: {', '.join(sorted(fields))})")
    root = project.root if project else Path.cwd()
    cwd = Path.cwd()
    values: dict[str, Any] = {}
    for name, f in fields.items():
        tp = hints[name]
        value, base_dir = dataclasses.MISSING, root
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
        # Who set the value, as an error about it names it; only a flag's is a usage error (exit 2).
        said, code = None, EXIT_ERROR
        for key in (name, name.replace("_", "-")):
            if key in toml_section:
                value = _coerce(toml_section[key], tp, f"[{section}] {key}", str(toml_path))
                base_dir, said, code = root, f"{toml_path}: [{section}] {key}", EXIT_ERROR
        var, flag = env_name(section, name), f"--{name.replace('_', '-')}"
        env = os.environ.get(var)
        if env is not None and env != "":
            value = _coerce(env, tp, var, "environment")
            base_dir, said, code = cwd, var, EXIT_ERROR
        if flags.get(name) is not None:
            value = _coerce(flags[name], tp, flag, "command line")
            base_dir, said, code = cwd, flag, EXIT_USAGE
        if value is dataclasses.MISSING:
            raise PersllmError(f"{section}: a value for {name} is required")
        wanted = _breaks(value, f.metadata.get("rules", {})) if said else None
        if wanted:
            raise PersllmError(f"{said} must be {wanted}, not {value!r}", exit_code=code)
        if isinstance(value, Path) and not value.is_absolute():
            value = (base_dir / value).resolve()
        elif isinstance(value, list):
            value = [(base_dir / v).resolve() if isinstance(v, Path) and not v.is_absolute() else v for v in value]
        values[name] = value
    return cls(**values)


def public_settings(settings: Any) -> dict[str, Any]:
    """Settings as JSON-ready data for sidecars and run.json, with anything secret-looking removed."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(settings):
        if is_secret_name(f.name):
            continue
        v = getattr(settings, f.name)
        out[f.name] = _jsonable(v)
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if dataclasses.is_dataclass(v):
        return {f.name: _jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    return v
