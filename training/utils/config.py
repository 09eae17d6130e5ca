"""Typed configurations: every flag is declared once, as a dataclass field, and argparse is generated from it.

A program's configuration is a dataclass whose fields are options or groups:

    @dataclass
    class LoraFlags:
        lora_dim: int = option(0, "LoRA rank; 0 disables LoRA.", check=at_least(0), resume=FIXED)

- `option(default, help, ...)` is one flag: its name is the field's name, its type the annotation
  (`int`, `float`, `str`, `bool` for a switch, with `--no_NAME` when it defaults to on or to None (unset),
  `X | None`, `list[str]` for several values), plus its range check and whether `--resume` may change it.
  Floats must be finite unless `finite=False`.
- `group(Flags, prefix="actor_", **defaults)` nests another configuration, its flags prefixed (step 3's
  `--actor_learning_rate` and `--critic_learning_rate` are one `learning_rate` option of `ModelFlags`),
  with defaults of its own.
- `@configuration(**defaults)` makes a dataclass and gives inherited options new defaults.

`parse_config(Config, argv)` parses, checks every option's range, then calls the configuration's
`validate()` for checks that span flags. Any failure ends in one UserInputError line naming the flag.
"""
import argparse
import dataclasses
import itertools
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields

from training.utils.errors import UserInputError

# May `--resume` change the option? FIXED options fix the data order, the schedule or the shape of the
# saved state: a resumed run must use the checkpoint's values. FREE ones may change and the new value is used
# from the resume on: logging, intervals, evaluation, sampling, loss weights, and the learning rates and weight
# decay, which the resume puts back into the restored optimizer and schedule (checkpoint.Checkpointer.resume).
FIXED, FREE = "fixed", "free"

_definitions = itertools.count()  # each option() call is one definition; inherited copies keep its number


def option(default=MISSING, help: str = "", *, check=None, choices=None, resume: str = FREE, required: bool = False,
           nargs=None, const=None, metavar: str | None = None, finite: bool = True):
    """One flag. `check(value)` returns None or what is wrong ("must be at least 1"); `required` flags
    default to None when the configuration is built in code."""
    metadata = {"help": help, "check": check, "choices": choices, "resume": resume, "required": required,
                "nargs": nargs, "const": const, "metavar": metavar, "finite": finite,
                "definition": next(_definitions)}
    if required:
        return field(default=None, metadata=metadata)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def group(cls, *, prefix: str = "", title: str | None = None, role: str = "the model",
          help: dict[str, str] | None = None, **defaults):
    """A nested configuration whose flags are `prefix + name`; `defaults` replace its fields' defaults,
    `help` replaces the help of some of its options, and `{role}` in any help reads `role`."""
    metadata = {"group": cls, "prefix": prefix, "title": title, "role": role, "help": help or {},
                "defaults": defaults}
    return field(default_factory=lambda: cls(**defaults), metadata=metadata)


def configuration(**defaults):
    """Class decorator: a dataclass whose inherited options get new defaults (their help and checks stay)."""
    def wrap(cls):
        own = cls.__dict__.get("__annotations__", {})
        for name, value in defaults.items():
            inherited = next((f for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)
                              for f in fields(base) if f.name == name), None)
            if inherited is None:
                raise TypeError(f"{cls.__name__}: no inherited option {name!r} to give a default")
            own[name] = inherited.type
            setattr(cls, name, field(default=value, metadata=inherited.metadata))
        cls.__annotations__ = own
        return dataclass(cls)
    return wrap


# ---------------------------------------------------------------------------------------------- checks
def at_least(low):
    return lambda value: None if value is None or value >= low else f"must be at least {low}"


def in_range(low, high, *, low_open: bool = False, high_open: bool = False):
    """low <= value <= high; `low_open` / `high_open` exclude the bound."""
    def check(value):
        if value is None:
            return None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if above and below:
            return None
        return f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return check


def positive(value):
    return None if value is None or value > 0 else "must be positive"


# ---------------------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, as every other bad input (argparse would print the usage first)."""
        self.exit(2, f"error: {message}\n")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


_finite_float.__name__ = "number"  # argparse names the type in "invalid number value: 'x'"


def _leaf_type(annotation):
    """(element type, takes a list) of an option's annotation: `X | None` -> X, `list[X]` -> X."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _options(cls, prefix: str = "", defaults: dict | None = None, role: str = "the model",
             help_overrides: dict | None = None, title: str | None = None):
    """Yield (flag name, field, element type, is list, default, help, group title) for every option."""
    hints = typing.get_type_hints(cls)
    defaults, help_overrides = defaults or {}, help_overrides or {}
    for f in fields(cls):
        meta = f.metadata
        if "group" in meta:
            yield from _options(meta["group"], prefix + meta["prefix"], meta["defaults"], meta["role"], meta["help"],
                                meta["title"] or title)
            continue
        if "help" not in meta:
            continue  # a plain field, not a flag
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not MISSING:
            default = f.default
        else:
            default = f.default_factory()
        leaf, is_list = _leaf_type(hints[f.name])
        text = help_overrides.get(f.name, meta["help"]).replace("{role}", role)
        yield prefix + f.name, f, leaf, is_list, default, text, title or (cls.__doc__ or "").split("\n")[0].strip()


def build_parser(cls, description: str = "") -> argparse.ArgumentParser:
    """The argparse parser of a configuration class (what `--help` shows)."""
    parser = _Parser(description=description)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f, leaf, is_list, default, text, title in _options(cls):
        meta = f.metadata
        target = groups.setdefault(title, parser.add_argument_group(title)) if title else parser
        kwargs = {"dest": name, "help": text, "default": default}
        if leaf is bool:
            target.add_argument(f"--{name}", action="store_true", **kwargs)
            if default or default is None:  # on by default, or unset (None: decided later): an off form too
                target.add_argument(f"--no_{name}", action="store_false", dest=name, help=f"Turn --{name} off.")
            continue
        kwargs["type"] = _finite_float if leaf is float and meta["finite"] else leaf
        for key in ("choices", "nargs", "const", "metavar"):
            if meta[key] is not None:
                kwargs[key] = meta[key]
        if is_list:
            kwargs.setdefault("nargs", "*")
        if meta["required"]:
            kwargs["required"] = True
        target.add_argument(f"--{name}", **kwargs)
    return parser


def _build(cls, values: dict, prefix: str = "", defaults: dict | None = None):
    kwargs = {}
    for f in fields(cls):
        if "group" in f.metadata:
            kwargs[f.name] = _build(f.metadata["group"], values, prefix + f.metadata["prefix"], f.metadata["defaults"])
        elif "help" in f.metadata and prefix + f.name in values:
            value = values[prefix + f.name]
            kwargs[f.name] = list(value) if isinstance(value, tuple) else value
    return cls(**{**(defaults or {}), **kwargs})


def parse_config(cls, argv=None, description: str = ""):
    """Parse `argv` into a `cls`, range-check every option, then run `validate()` (cross-flag checks)."""
    namespace = build_parser(cls, description).parse_args(argv)
    config = _build(cls, vars(namespace))
    check_options(config)
    if hasattr(config, "validate"):
        config.validate()
    return config


def check_options(config) -> None:
    """Every option's own range check (also for configurations built in code)."""
    for name, value, meta in _walk(config):
        problem = meta["check"](value) if meta["check"] else None
        if problem:
            raise UserInputError(f"--{name} {problem} (got {value!r})")


def _walk(config, prefix: str = ""):
    """(flag name, value, option metadata) of every option of a configuration instance."""
    for f in fields(config):
        value = getattr(config, f.name)
        if "group" in f.metadata:
            yield from _walk(value, prefix + f.metadata["prefix"])
        elif "help" in f.metadata:
            yield prefix + f.name, value, f.metadata


def flag_values(config) -> dict:
    """{flag name: value} of every option: what `training_args.json` records."""
    return {name: value for name, value, _ in _walk(config)}


def fixed_flag_values(config) -> dict:
    """The options `--resume` must not change (see FIXED)."""
    return {name: value for name, value, meta in _walk(config) if meta["resume"] == FIXED}


def flag_definitions(cls) -> list[tuple[str, int, str, object]]:
    """(flag name, definition number, help, default) of every option of a configuration class, in parser order:
    two programs' flags of one name are the same flag exactly when their definition numbers are equal."""
    return [(name, f.metadata["definition"], text, default) for name, f, _, _, default, text, _ in _options(cls)]


def flag_groups(cls) -> list[tuple[str, list[tuple[str, object, bool, str, str]]]]:
    """[(group title, [(flag, default, required, resume rule, help)])] in parser order, for the flag reference."""
    grouped: dict[str, list] = {}
    for name, f, _, _, default, text, title in _options(cls):
        grouped.setdefault(title or "options", []).append(
            (name, default, f.metadata["required"], f.metadata["resume"], text))
    return list(grouped.items())
