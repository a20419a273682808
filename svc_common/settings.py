"""One definition per setting: a config dataclass field carries its flag, environment variable and help.

Every service's command line, its environment variables, `fastswitch up` (which starts the services)
and the compose file are derived from these definitions, so a setting is declared exactly once:

    @dataclass(slots=True)
    class SwapDaemonConfig:
        host_blocks: int = setting(4096, env="FASTSWITCH_HOST_BLOCKS", help="blocks in the host pool")

- `add_arguments(parser, Config)`: argparse flags whose defaults come from the environment.
- `from_args(Config, args)`: the validated config (ValueError says what is wrong).
- `to_argv(config)`: the flags that reproduce a config (how `fastswitch up` starts each service).
- `env_names(Config)`: the environment variables a service reads (the compose file is checked against it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True, slots=True)
class Setting:
    """How one config field appears on the command line and in the environment."""

    flag: str | None  # None: derived from the field name (`max_running` -> `--max-running`)
    env: str | None
    help: str
    choices: tuple[str, ...] | None = None
    negate: bool = False  # a bool whose flag turns it off (`kv_reuse` <- `--no-kv-reuse`)
    item: Callable[[str], tuple[str, Any]] | None = None  # a dict built from repeated `KEY=VALUE` flags
    metavar: str | None = None
    many: bool = False  # a list of strings from a repeated flag (environment: items separated by ';' or spaces)


def setting(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    flag: str | None = None,
    env: str | None = None,
    help: str = "",
    choices: Iterable[str] | None = None,
    negate: bool = False,
    item: Callable[[str], tuple[str, Any]] | None = None,
    metavar: str | None = None,
    many: bool = False,
) -> Any:
    """A dataclass field that is also a command-line flag and (optionally) an environment variable."""
    meta = {"setting": Setting(flag, env, help, tuple(choices) if choices else None, negate, item, metavar, many)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _settings(config_type: type) -> list[tuple[dataclasses.Field[Any], Setting]]:
    return [(f, f.metadata["setting"]) for f in dataclasses.fields(config_type) if "setting" in f.metadata]


def flag_of(f: dataclasses.Field[Any], s: Setting) -> str:
    return s.flag or "--" + f.name.replace("_", "-")


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"setting {f.name} has no default")


def _scalar(type_name: str) -> Callable[[str], Any]:
    return {"int": int, "float": float, "str": str}[type_name]


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def _type_name(f: dataclasses.Field[Any]) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return t.split("[")[0].split("|")[0].strip()


def _read(f: dataclasses.Field[Any], s: Setting, text: str) -> Any:
    """The field's value from its text form (a flag's or an environment variable's)."""
    kind = _type_name(f)
    if kind == "bool":
        return _bool(text)
    if s.item is not None:
        return dict(s.item(part) for part in text.split(",") if part.strip())
    if s.many:
        return text.replace(";", " ").split()
    try:
        return _scalar(kind)(text)
    except ValueError:
        raise ValueError(f"expected {'an' if kind == 'int' else 'a'} {kind}") from None


def parse_value(config_type: type, name: str, text: str) -> Any:
    """A setting's value read from text, by its field's type and choices: `parse_value(ExecutorConfig,
    "cuda_graphs", "on")` is True. Raises KeyError for a name the config lacks, ValueError for bad text."""
    for f, s in _settings(config_type):
        if f.name == name:
            try:
                value = _read(f, s, text)
            except ValueError as err:
                raise ValueError(f"{name}={text!r}: {err}") from None
            if s.choices and value not in s.choices:
                raise ValueError(f"{name}={text!r}: expected one of {', '.join(s.choices)}")
            return value
    raise KeyError(name)


def _from_env(f: dataclasses.Field[Any], s: Setting, environ: dict[str, str]) -> Any:
    """The field's default, overridden by its environment variable when that is set."""
    default = _default(f)
    if s.env is None or s.env not in environ:
        return default
    text = environ[s.env]
    try:
        value = _read(f, s, text)
        return not value if s.negate and _type_name(f) == "bool" else value
    except ValueError as err:
        raise ValueError(f"environment variable {s.env}={text!r} is not valid: {err}") from None


class _Many(argparse.Action):
    """A repeated flag into a list; the first use replaces the default (from the environment)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any, _: Any = None
    ) -> None:
        seen = f"_{self.dest}_given"
        items = list(getattr(namespace, self.dest) or []) if getattr(namespace, seen, False) else []
        setattr(namespace, seen, True)
        setattr(namespace, self.dest, [*items, value])


class _Items(argparse.Action):
    """Repeated KEY=VALUE flags into one dict (the environment's value is the starting point)."""

    def __init__(self, *args: Any, parse: Callable[[str], tuple[str, Any]], **kwargs: Any) -> None:
        self.parse = parse
        super().__init__(*args, **kwargs)

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any, _: Any = None
    ) -> None:
        items = dict(getattr(namespace, self.dest) or {})
        try:
            key, parsed = self.parse(value)
        except ValueError as err:
            parser.error(f"{self.option_strings[0]} {value}: {err}")
        items[key] = parsed
        setattr(namespace, self.dest, items)


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    config_type: type,
    *,
    exclude: Iterable[str] = (),
    environ: dict[str, str] | None = None,
) -> list[str]:
    """Add a flag for every setting of `config_type` (defaults from the environment); returns the
    field names added. Fields in `exclude`, or whose flag the parser already has, are skipped."""
    environ = dict(os.environ) if environ is None else environ
    skip = set(exclude)
    existing = set(getattr(parser, "_option_string_actions", {}))
    added = []
    for f, s in _settings(config_type):
        flag = flag_of(f, s)
        if f.name in skip or flag in existing:
            continue
        try:
            default = _from_env(f, s, environ)
        except ValueError as err:
            raise SystemExit(f"{parser_prog(parser)}: error: {err}") from None
        shown = _default(f)
        where = f"; env {s.env}" if s.env else ""
        kind = _type_name(f)
        if kind == "bool":
            shown_default = "off" if (not shown if s.negate else shown) is False else "on"
            parser.add_argument(
                flag,
                dest=f.name,
                action="store_false" if s.negate else "store_true",
                default=default,
                help=f"{s.help} (default: {shown_default}{where})",
            )
        elif s.many:
            parser.add_argument(
                flag,
                dest=f.name,
                action=_Many,
                default=default,
                metavar=s.metavar,
                help=f"{s.help} (repeatable; default: {' '.join(shown) or 'none'}{where}, ';'-separated)",
            )
        elif s.item is not None:
            parser.add_argument(
                flag,
                dest=f.name,
                action=_Items,
                parse=s.item,
                default=default,
                metavar=s.metavar,
                help=f"{s.help} (repeatable{where}, comma-separated)",
            )
        else:
            parser.add_argument(
                flag,
                dest=f.name,
                type=_scalar(kind),
                default=default,
                choices=s.choices,
                metavar=s.metavar,
                help=f"{s.help} (default: {shown!r}{where})" if shown != "" else f"{s.help} ({where[2:]})",
            )
        added.append(f.name)
    return added


def parser_prog(parser: Any) -> str:
    return getattr(parser, "prog", None) or getattr(getattr(parser, "_container", None), "prog", "fastswitch")


def from_args(config_type: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """Build (and validate) a config from parsed flags; names absent from `args` keep their defaults."""
    values = {f.name: getattr(args, f.name) for f, _ in _settings(config_type) if hasattr(args, f.name)}
    values.update(overrides)
    config = config_type(**values)
    config.validate()
    return config


def to_argv(config: Any, *, exclude: Iterable[str] = ()) -> list[str]:
    """Flags that reproduce `config` (every setting, explicitly: the child ignores its environment)."""
    skip = set(exclude)
    argv: list[str] = []
    for f, s in _settings(type(config)):
        if f.name in skip:
            continue
        value = getattr(config, f.name)
        flag = flag_of(f, s)
        if isinstance(value, bool):
            if value != s.negate:
                argv.append(flag)
        elif s.item is not None:
            for key, item in value.items():
                argv += [flag, f"{key}={item}"]
        elif s.many:
            for item in value:
                argv += [flag, item]
        else:
            argv += [flag, str(value)]
    return argv


def env_names(config_type: type) -> set[str]:
    return {s.env for _, s in _settings(config_type) if s.env}


def field_names(config_type: type) -> set[str]:
    return {f.name for f, _ in _settings(config_type)}


class OneLineParser(argparse.ArgumentParser):
    """A bad flag or value: one line saying what is wrong, exit code 2 (no usage dump, no traceback)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_parser(prog: str, description: str | None, config_type: type, argv: list[str] | None) -> Any:
    """The whole entry point of a service's command line: parse, build, validate; bad input exits 2
    with one line saying what is wrong."""
    parser = OneLineParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, config_type)
    args = parser.parse_args(argv)
    try:
        return from_args(config_type, args)
    except ValueError as err:
        parser.error(str(err))


# -- settings every service has (each service's config declares them with these) --------------------


def bind_host_setting(default: str = "::") -> Any:
    return setting(default, flag="--host", env="FASTSWITCH_HOST", help="address to bind (:: or 0.0.0.0: all)")


def tls_cert_setting() -> Any:
    return setting(
        "", env="FASTSWITCH_TLS_CERT", metavar="FILE", help="PEM certificate: serve TLS on this port (with --tls-key)"
    )


def tls_key_setting() -> Any:
    return setting("", env="FASTSWITCH_TLS_KEY", metavar="FILE", help="PEM private key of --tls-cert")


def api_keys_setting() -> Any:
    """The key file of a front that serves clients (the scheduler's gRPC API, the HTTP API): svc_common/auth.py."""
    return setting(
        "", env="FASTSWITCH_API_KEYS", metavar="FILE",
        help="key file, lines `KEY TENANT [max-priority=P] [max-requests=N] [admin]` (empty: open, no auth)",
    )  # fmt: skip


def drain_timeout_setting() -> Any:
    return setting(
        30.0, flag="--drain-timeout", env="FASTSWITCH_DRAIN_TIMEOUT_S",
        help="on SIGTERM, seconds live work may take to finish before the service stops",
    )  # fmt: skip


def is_host_port(text: str) -> bool:
    """Whether text is HOST:PORT with a port in 1..65535."""
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def validate_tls(cert: str, key: str) -> None:
    """Both or neither, and both readable: a bad path is said at start, not at the first connection."""
    if bool(cert) != bool(key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    for path, what in ((cert, "--tls-cert"), (key, "--tls-key")):
        if path and not os.path.isfile(path):
            raise ValueError(f"{what} {path}: no such file")
