"""The config's building blocks (ddps.app.schema): options and their constraints, the plug-in
registries and the sections they assemble, the library's ArgumentError under a key's name; and the
registries as the config sees them."""
import dataclasses
from dataclasses import dataclass

import pytest

from ddps._checks import ArgumentError
from ddps.app import config
from ddps.app.schema import DATASETS, HEADS, SEGMENTORS, ConfigError, Registry, check_constraints, keyed, option


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
    check_constraints(value)
    value.depth = -1  # the entry's constraint came along
    with pytest.raises(ConfigError, match="depth: must be >= 0, got -1"):
        check_constraints(value, "thing.")


@pytest.mark.parametrize("field,value,message", [
    ("kind", "c", r"thing.kind: 'c' is not one of \('a', 'b'\)"),
    ("size", 0, "thing.size: must be >= 1, got 0"),
    ("pair", [1], r"thing.pair: expected 2 values, got \[1\]"),
    ("maybe", -2, "thing.maybe: must be >= 0, got -2"),
])
def test_constraints_name_the_key(field, value, message):
    base = Base()
    check_constraints(base, "thing.")
    setattr(base, field, value)
    with pytest.raises(ConfigError, match=message):
        check_constraints(base, "thing.")


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
    assert cfg.data.synthetic.num_train == 512 and cfg.segmentor.diff.eta == 0.0 and cfg.head.gss.codes == 256
    assert (cfg.segmentor.variant, cfg.head.transition, cfg.data.num_classes) == ("b2", "uniform", None)


@pytest.mark.parametrize("kind", HEADS.names())
def test_every_head_builds_on_the_protocol(kind):
    from ddps.app.model import build_head
    from ddps.nn import MaskHead

    cfg = config.load(config.find("synthetic-smoke"), [f"head.kind={kind}"])
    for for_training in (True, False):
        head = build_head(cfg, 16, for_training)
        assert isinstance(head, MaskHead) and head.metrics_name == kind
        head.load_trained(head.averaged_state())
