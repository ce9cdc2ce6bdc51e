"""The config's building blocks (ddps.app.schema): options and their constraints, the plug-in
registries and the sections they assemble, the library's ArgumentError under a key's name; and the
registries as the config sees them."""
import dataclasses
import typing
from dataclasses import dataclass

import pytest

from ddps._checks import ArgumentError
from ddps.app import config
from ddps.app.schema import (DATASETS, HEADS, SEGMENTORS, ConfigError, Registry, check_constraints, constraints,
                             keyed, option)


@dataclass
class Base:
    kind: str = option("a", choices=("a", "b"))
    size: int = option(3, minimum=1)
    pair: list[int] = option([1, 2], length=2)
    maybe: int | None = option(None, minimum=0)


@dataclass
class AOptions:
    depth: int = option(2, minimum=0)


@dataclass
class Inner:
    width: float = 0.5


@dataclass
class BOptions:
    inner: Inner = dataclasses.field(default_factory=Inner)


def _registry():
    registry = Registry("thing.kind")
    registry.register("a", lambda cfg: "built a", AOptions)
    registry.register("b", lambda cfg: "built b", BOptions, check=lambda cfg: None, extra_fact=7)
    return registry


def test_a_section_gains_each_entrys_own_keys():
    section = _registry().section(Base)
    assert [f.name for f in dataclasses.fields(section)] == ["kind", "size", "pair", "maybe", "depth", "inner"]
    value = section()
    assert (value.kind, value.depth, value.inner.width, value.pair) == ("a", 2, 0.5, [1, 2])
    assert section().pair is not value.pair  # a list default is each config's own
    assert check_constraints(value) == []
    value.depth = -1  # the entry's constraint came along
    assert check_constraints(value, "thing.") == ["thing.depth: must be >= 0, got -1"]


@pytest.mark.parametrize("field,value,message", [
    ("kind", "c", "thing.kind: 'c' is not one of ('a', 'b')"),
    ("size", 0, "thing.size: must be >= 1, got 0"),
    ("pair", [1], "thing.pair: expected 2 values, got [1]"),
    ("maybe", -2, "thing.maybe: must be >= 0, got -2"),
])
def test_constraints_name_the_key(field, value, message):
    base = Base()
    assert check_constraints(base, "thing.") == []
    setattr(base, field, value)
    assert check_constraints(base, "thing.") == [message]


@dataclasses.dataclass
class Ranged:
    rate: float = option(0.5, above=0, maximum=1)
    betas: list[float] = option([0.1, 0.2], minimum=0, below=1)
    free: float = option(1.0, unbounded=True)


@dataclasses.dataclass
class RangedChild(Ranged):
    rate: float = 0.25  # a new default, the base's range


@pytest.mark.parametrize("field,value,message", [
    ("rate", 0.0, "must be in (0, 1], got 0.0"),
    ("rate", 1.5, "must be in (0, 1], got 1.5"),
    ("rate", float("nan"), "must be a finite number, got nan"),
    ("free", float("-inf"), "must be a finite number, got -inf"),
])
def test_ranges_bounds_and_finiteness(field, value, message):
    for cls in (Ranged, RangedChild):
        section = cls()
        assert check_constraints(section) == []
        setattr(section, field, value)
        assert check_constraints(section, "s.") == [f"s.{field}: {message}"]
    assert check_constraints(Ranged(betas=[1.0, -0.5, 0.5]), "s.") == [
        "s.betas[0]: must be in [0, 1), got 1.0", "s.betas[1]: must be in [0, 1), got -0.5"]
    assert check_constraints(Ranged(free=-1e30)) == []


@dataclasses.dataclass
class Bounded:
    at_most: float = option(0.5, maximum=10)
    under: float = option(0.5, below=1)
    over: int = option(1, above=0)


def test_each_kind_of_bound_reads_as_it_is_checked():
    assert check_constraints(Bounded(at_most=10.0, under=0.999, over=1)) == []  # the bounds themselves
    assert check_constraints(Bounded(at_most=10.5, under=1.0, over=0), "s.") == [
        "s.at_most: must be <= 10, got 10.5", "s.under: must be < 1, got 1.0", "s.over: must be > 0, got 0"]


def _numbers(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _numbers(hint, f"{prefix}{f.name}.")
        elif {int, float} & set(_leaves(hint)):
            yield prefix + f.name, constraints(cls, f.name)


def _leaves(hint):
    args = typing.get_args(hint)
    return [leaf for a in args for leaf in _leaves(a)] if args else [hint]


def test_every_number_of_the_config_has_a_range():
    # a new key without one would let a value that cannot work reach the training loop
    from ddps.app.config import Config

    ranged = {"minimum", "maximum", "above", "below", "choices", "unbounded", "library"}
    unranged = [key for key, meta in _numbers(Config) if not ranged & set(meta)]
    assert unranged == []


def test_registry_lookups_and_mistakes():
    registry = _registry()
    assert registry.names() == ("a", "b") and registry["b"].build(None) == "built b" and registry["b"].extra_fact == 7
    with pytest.raises(ConfigError, match=r"thing.kind: 'c' is not one of \('a', 'b'\)"):
        registry["c"]
    with pytest.raises(TypeError, match="'a' is registered twice"):
        registry.register("a", lambda cfg: None)
    registry.register("c", lambda cfg: None, AOptions)  # a second entry with the key depth
    with pytest.raises(TypeError, match="thing.kind=c: the key depth is taken"):
        registry.section(Base)


def test_keyed_names_the_key_of_the_argument():
    with pytest.raises(ConfigError, match="head.dim: dim=3 is odd"):
        with keyed({"dim": "head.dim"}):
            raise ArgumentError("dim", "dim=3 is odd")
    with pytest.raises(ArgumentError, match="other"):  # an argument it has no key for goes through
        with keyed({"dim": "head.dim"}):
            raise ArgumentError("other", "other")


def test_the_config_offers_what_the_registries_hold():
    cfg = config.Config()
    for registry, value in ((DATASETS, cfg.data.dataset), (SEGMENTORS, cfg.segmentor.type), (HEADS, cfg.head.kind)):
        assert value in registry.names()
        key = registry.key
        with pytest.raises(ConfigError, match=rf"{key}: 'nope' is not one of {tuple(registry.names())}".replace(
                "(", r"\(").replace(")", r"\)")):
            config.load(None, [f"{key}=nope"], reads_data=False)
    # each plug-in's own keys are in its kind's section, with their defaults
    assert cfg.data.synthetic.num_train == 512 and cfg.segmentor.diff.eta == 1.0 and cfg.head.gss.codes == 256
    assert (cfg.segmentor.variant, cfg.head.transition, cfg.data.num_classes) == ("b2", "uniform", None)


@pytest.mark.parametrize("kind", HEADS.names())
def test_every_head_builds_on_the_protocol(kind):
    from ddps.app.model import build_head
    from ddps.nn import MaskHead

    # GSS's conditioning trains the backbone, which the moving average does not cover
    cfg = config.load(config.find("synthetic-smoke"), [f"head.kind={kind}", *["eval.use_ema=false"] * (kind == "gss")])
    for for_training in (True, False):
        head = build_head(cfg, 16, for_training, level_channels=(16, 8, 16, 16))
        assert isinstance(head, MaskHead) and head.metrics_name == kind
        head.load_trained(head.averaged_state())
