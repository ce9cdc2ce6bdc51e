"""What the run config is built from, apart from its sections: the error a bad value raises
(naming its key), ``option`` (a field with its constraints), the registries through which each
plug-in (dataset, segmentor, head) brings its builder, its config keys and its checks, and
``keyed``, which turns a library's ``ArgumentError`` into an error naming the config key."""
from __future__ import annotations

import contextlib
import dataclasses
import types
import typing

from .._checks import ArgumentError


class ConfigError(ValueError):
    pass


def option(default, *, choices: tuple | None = None, minimum: float | None = None, length: int | None = None):
    """A config field. ``choices``: the values it may take; ``minimum``: its least value (None
    passes); ``length``: the length of a list. A list default is copied for each config."""
    metadata = {k: v for k, v in (("choices", choices), ("minimum", minimum), ("length", length)) if v is not None}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_constraints(section, prefix: str = "") -> None:
    """Every ``option`` constraint of a config section and of the sections inside it."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_constraints(value, key + ".")
            continue
        meta = f.metadata
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{key}: {value!r} is not one of {tuple(meta['choices'])}")
        if "minimum" in meta and value is not None and value < meta["minimum"]:
            raise ConfigError(f"{key}: must be >= {meta['minimum']}, got {value}")
        if "length" in meta and len(value) != meta["length"]:
            raise ConfigError(f"{key}: expected {meta['length']} values, got {value}")


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
SEGMENTORS = Registry("segmentor.type")    # build(cfg, num_classes) -> Segmentor
HEADS = Registry("head.kind")              # build(cfg, num_classes, ignore_index, cond_channels, for_training)
