"""Property-based config fuzz: every bad value of every numeric, list or boolean field of every
option of every config group is refused by `validate` (which does no work) with a message that
names the field. Bad means: the wrong type (a float or bool for an int, a string for a number or a
list, a scalar for a list), not finite, negative, or 0 for a size, count, period or rate."""
import copy
from functools import lru_cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from nlcl.config import ConfigError, compose, config_dir, validate
from nlcl.config_checks import POSITIVE, ZERO_ALLOWED
from tests.test_configs import REQUIRED  # the fields a user's-own-data option must be given

GROUPS = ("task", "model", "strategy", "optim", "trainer")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((config_dir() / g).glob("*.yaml"))
           if (g, f.stem) != ("trainer", "gpu")]  # needs a GPU; its accelerator check is tested apart
SKIP = {"trainer.precision", "trainer.accelerator"}  # names checked against their own lists


@lru_cache(maxsize=None)
def base(group: str, option: str):
    choice = f"{group}={option}"
    return compose(["run_dir=/tmp/nlcl-fuzz-never-written", choice, *REQUIRED.get(choice, [])])


def leaves(node, prefix):
    for key, value in node.items():
        path = f"{prefix}.{key}"
        if isinstance(value, dict):
            yield from leaves(value, path)
        elif path not in SKIP and (isinstance(value, (int, float, list)) and value != []):
            yield path, value


FIELDS = sorted({(g, o, path, repr(v)) for g, o in OPTIONS
                 for path, v in leaves(OmegaConf.to_container(base(g, o)[g], resolve=True), g)})


def bad_values(path: str, value):
    key = path.rsplit(".", 1)[-1]
    never = [st.just(float("nan")), st.just(float("inf")), st.just(float("-inf")),
             st.integers(max_value=-1), st.floats(max_value=-1e-6, allow_nan=False)]
    if isinstance(value, bool):
        return st.one_of(st.text(min_size=1), st.integers(), st.floats(allow_nan=True))
    if isinstance(value, int):
        zero = [st.just(0)] if POSITIVE.search(key) and key not in ZERO_ALLOWED else []
        return st.one_of(st.floats(allow_nan=True), st.booleans(), st.text(min_size=1),
                         st.lists(st.integers(1, 9), min_size=1, max_size=3), *never, *zero)
    if isinstance(value, float):
        zero = [st.just(0.0)] if POSITIVE.search(key) and key not in ZERO_ALLOWED else []
        return st.one_of(st.booleans(), st.text(min_size=1), st.lists(st.floats(0, 1), min_size=1, max_size=3),
                         *never, *zero)
    if isinstance(value, list):  # a string or a scalar where a list is meant, or a list holding a bad number
        inner = [st.lists(st.one_of(*never), min_size=1, max_size=3)] if all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) else []
        return st.one_of(st.text(min_size=1), st.integers(1, 99), *inner)
    raise AssertionError(path)


@st.composite
def bad_case(draw):
    group, option, path, value = draw(st.sampled_from(FIELDS))
    return group, option, path, draw(bad_values(path, eval(value)))  # noqa: S307 - our own repr


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(bad_case())
def test_every_bad_value_is_refused_naming_its_field(case):
    group, option, path, bad = case
    cfg = copy.deepcopy(base(group, option))
    OmegaConf.update(cfg, path, bad, force_add=True)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith(f"{path}:"), (path, bad, str(err.value))


def test_the_fuzz_reaches_every_group_and_many_fields():
    assert {g for g, *_ in FIELDS} == set(GROUPS)
    assert len({(g, p) for g, _, p, _ in FIELDS}) > 50


@pytest.mark.parametrize("override, field, hint", [
    ("+sed=3", "sed", "did you mean 'seed'"),
    ("trainer.epoch=2", "trainer.epoch", "did you mean 'epochs'"),
    ("model=hoep", "model=hoep", "did you mean 'hope'"),
    ("strategy=rplay", "strategy=rplay", "did you mean 'replay'"),
    ("task.train_per_class=1.5", "task.train_per_class", "integer"),
    ("task.train_per_class=true", "task.train_per_class", "integer"),
    ("model=hope", "model.cms.periods", "a list"),
    ("model.n_heads=3", "model.n_heads", "divide"),
    ("trainer.gradient_clip='12'", "trainer.gradient_clip", "number"),
    ("~trainer.epochs", "trainer.epochs", "missing"),
    ("run_dir=", "run_dir", "must name a folder"),
    ("run_dir=/dev/null/x", "run_dir", "cannot be created"),
    ("strategy=ewc", "strategy.ewc_lambda", "finite"),
    ("optim.lr=inf", "optim.lr", "finite"),
])
def test_the_silent_configs_of_the_fault_campaign_are_refused(override, field, hint):
    extra = {"model=hope": ["model.cms.periods='18'"], "strategy=ewc": ["strategy.ewc_lambda=inf"]}.get(override, [])
    overrides = ["run_dir=/tmp/nlcl-fuzz-never-written", override, *extra]
    if override.startswith("run_dir="):
        overrides = overrides[1:]
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    msg = str(err.value)
    assert msg.startswith(field) and hint in msg, msg
    assert "\n" not in msg
