import dataclasses
from typing import Literal, Optional

import pytest

from lt_jax import config as cfglib


@dataclasses.dataclass(frozen=True)
class Inner:
    size: int = 2
    rate: float = 0.1
    kind: Literal["a", "b"] = "a"

    def __post_init__(self):
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"
    inner: Inner = dataclasses.field(default_factory=Inner)
    dims: tuple[int, ...] = (1, 2)
    maybe: Optional[int] = None


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\ninner:\n  size: 4\n  rate: 1e-4\n")
    cfg = cfglib.load(Outer, str(path), ["inner.kind=b", "dims=[3,4,5]", "maybe=7"])
    assert cfg == Outer(name="run", inner=Inner(size=4, rate=1e-4, kind="b"), dims=(3, 4, 5), maybe=7)
    assert cfglib.from_dict(Outer, cfglib.to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["inner.sise=3"], "inner.sise: unknown key; allowed: kind, rate, size"),
        (["inner.size=two"], "inner.size: expected int, got 'two'"),
        (["inner.kind=c"], "inner.kind: 'c' is not allowed; allowed: 'a', 'b'"),
        (["inner.size=-1"], "size must be positive, got -1"),
        (["dims=3"], "dims: expected a list"),
        (["name"], "expected the form a.b=value"),
    ],
)
def test_errors_name_the_key(overrides, message):
    with pytest.raises(cfglib.ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        cfglib.load(Outer, None, overrides)


def test_error_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("inner: {size: 1.5}\n")
    with pytest.raises(cfglib.ConfigError, match=r"bad.yaml: inner.size: expected int, got 1.5"):
        cfglib.load(Outer, str(path))
