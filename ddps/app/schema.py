"""What the run config is built from, apart from its sections: the error a bad value raises
(naming its key), ``option`` (a field with its constraints), the registries through which each
plug-in (dataset, segmentor, head) brings its builder, its config keys and its checks, and
``keyed``, which turns a library's ``ArgumentError`` into an error naming the config key."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing

from .._checks import ArgumentError


class ConfigError(ValueError):
    """What is wrong with a config (or with what it points to), one line per problem; the
    command line prints each as an error of its own."""

    def __init__(self, *problems: str):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def option(default, *, choices: tuple | None = None, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, below: float | None = None, length: int | None = None,
           unbounded: bool = False, library: bool = False):
    """A config field. ``choices``: the values it may take; ``minimum`` / ``maximum``: its least
    and greatest value, ``above`` / ``below``: bounds it must exceed / stay under (None passes;
    for a list, every item); ``length``: the length of a list; ``unbounded``: a number that may
    take any finite value (every other number has a range, tests/app/test_schema.py checks). A
    subclass that only changes a field's default keeps its constraints. A list default is copied
    for each config. ``library``: a number whose range a library rule checks (an ArgumentError
    that ``keyed`` names the key of), not repeated here."""
    metadata = {k: v for k, v in (("choices", choices), ("minimum", minimum), ("maximum", maximum),
                                  ("above", above), ("below", below), ("length", length)) if v is not None}
    metadata.update({k: True for k, v in (("unbounded", unbounded), ("library", library)) if v})
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def constraints(cls: type, name: str) -> dict:
    """The constraints of field ``name`` of a config dataclass: its own, and those of the same
    field in the classes it derives from (a subclass giving a field another default with a bare
    annotation keeps its base's range)."""
    meta = {}
    for klass in reversed(cls.__mro__):
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None:
            meta.update(f.metadata)
    return meta


def _range_text(meta: dict) -> str:
    low = f"[{meta['minimum']}" if "minimum" in meta else f"({meta['above']}" if "above" in meta else None
    high = f"{meta['maximum']}]" if "maximum" in meta else f"{meta['below']})" if "below" in meta else None
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1:]}"
    return f"{'<=' if high[-1] == ']' else '<'} {high[:-1]}"


def _out_of_range(value, meta: dict) -> bool:
    return ("minimum" in meta and value < meta["minimum"] or "maximum" in meta and value > meta["maximum"]
            or "above" in meta and value <= meta["above"] or "below" in meta and value >= meta["below"])


def _items(key: str, value):
    """(key, value) of a value, or of every number in a (nested) list, keyed key[i][j]."""
    if not isinstance(value, list):
        return [(key, value)]
    return [item for i, v in enumerate(value) for item in _items(f"{key}[{i}]", v)]


def check_constraints(section, prefix: str = "") -> list[str]:
    """The problems (one line each, naming the key) with every ``option`` constraint of a config
    section and of the sections inside it, and with every number that is not finite."""
    problems = []
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            problems += check_constraints(value, key + ".")
            continue
        meta = constraints(type(section), f.name)
        if "choices" in meta and value not in meta["choices"]:
            problems.append(f"{key}: {value!r} is not one of {tuple(meta['choices'])}")
        if "length" in meta and len(value) != meta["length"]:
            problems.append(f"{key}: expected {meta['length']} values, got {value}")
        for item_key, item in _items(key, value):
            if isinstance(item, float) and not math.isfinite(item):
                problems.append(f"{item_key}: must be a finite number, got {item}")
            elif isinstance(item, (int, float)) and not isinstance(item, bool) and _out_of_range(item, meta):
                problems.append(f"{item_key}: must be {_range_text(meta)}, got {item}")
    return problems


@contextlib.contextmanager
def keyed(keys: dict[str, str]):
    """Within: a library's ArgumentError about one of ``keys`` (argument -> config key) becomes a
    ConfigError naming the key, with the library's own message."""
    try:
        yield
    except ArgumentError as e:
        if e.argument not in keys:
            raise
        raise ConfigError(f"{keys[e.argument]}: {e}") from None


class Registry:
    """The plug-ins of one kind, by the name ``key`` (a config key such as ``head.kind``) selects.
    ``register(name, build, options=None, check=None, **extra)``: ``build`` makes the plug-in from
    a config; ``options``, a dataclass whose fields join the kind's config section (its own keys);
    ``check(cfg)``, its rules for a config that selects it (raising ConfigError); ``extra``, what
    else its kind asks of an entry (a dataset's classes)."""

    def __init__(self, key: str):
        self.key = key
        self.entries: dict[str, types.SimpleNamespace] = {}

    def register(self, name: str, build, options: type | None = None, check=None, **extra) -> None:
        if name in self.entries:
            raise TypeError(f"{self.key}: {name!r} is registered twice")
        self.entries[name] = types.SimpleNamespace(name=name, build=build, options=options, check=check, **extra)

    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def __getitem__(self, name: str) -> types.SimpleNamespace:
        if name not in self.entries:
            raise ConfigError(f"{self.key}: {name!r} is not one of {self.names()}")
        return self.entries[name]

    def section(self, base: type) -> type:
        """``base`` (a dataclass) with every entry's own fields after its own, as one dataclass."""
        taken = {f.name for f in dataclasses.fields(base)}
        fields = []
        for entry in self.entries.values():
            if entry.options is None:
                continue
            hints = typing.get_type_hints(entry.options)
            for f in dataclasses.fields(entry.options):
                if f.name in taken:
                    raise TypeError(f"{self.key}={entry.name}: the key {f.name} is taken")
                taken.add(f.name)
                fields.append((f.name, hints[f.name], dataclasses.field(
                    default=f.default, default_factory=f.default_factory, metadata=f.metadata)))
        return dataclasses.make_dataclass(base.__name__, fields, bases=(base,))


# One registry per plug-in kind. A plug-in is one module that registers itself here and is
# imported by its kind's package (ddps.app.data, .segmentors, .heads).
DATASETS = Registry("data.dataset")        # build(cfg, split "train"|"val"); classes(cfg) -> (K, ignore);
                                           # needs_root: reads data.root
SEGMENTORS = Registry("segmentor.type")    # build(cfg, num_classes) -> Segmentor; source_file: the file
                                           # a segmentor.pretrained folder or hub id holds (config.json)
HEADS = Registry("head.kind")              # build(cfg, num_classes, ignore_index, cond_channels, for_training)
