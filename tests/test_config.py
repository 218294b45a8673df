"""The field validators every config uses (tdqrt.engines.config): what they accept, what they refuse, and the one
message style ``NAME: expected WHAT, got VALUE; fix: HOW``."""
import math

import pytest

from tdqrt.engines.config import (check_bool, check_choice, check_int, check_real, check_text, invalid, is_int,
                                  is_real, label)
from tdqrt.engines.errors import ConfigError


def test_int_and_real_predicates():
    assert is_int(0) and is_int(-3) and not is_int(True) and not is_int(2.0) and not is_int("2")
    assert is_real(1) and is_real(0.5) and not is_real(True) and not is_real(math.nan) and not is_real("1")
    assert not is_real(math.inf) and is_real(math.inf, finite=False) and not is_real(math.nan, finite=False)


def test_check_int_bounds_and_optional():
    assert check_int("n", 5, 1, 5) == 5 and check_int("n", -7) == -7 and check_int("n", None, 1, optional=True) is None
    for bad in (0, 6, 2.0, True, None, "3"):
        with pytest.raises(ConfigError):
            check_int("n", bad, 1, 5)


def test_check_real_inclusive_exclusive_and_finite():
    assert check_real("x", 0, 0.0, 1.0) == 0.0 and isinstance(check_real("x", 1, 0.0, 1.0), float)
    assert check_real("x", math.inf, above=0.0, finite=False) == math.inf
    assert check_real("x", None, above=0.0, optional=True) is None
    for bad, kwargs in [(0.0, dict(above=0.0)), (1.0, dict(below=1.0)), (-0.1, dict(minimum=0.0)),
                        (1.5, dict(maximum=1.0)), (math.nan, {}), (math.inf, {}), (True, {}), ("1", {}), (None, {})]:
        with pytest.raises(ConfigError):
            check_real("x", bad, **kwargs)


def test_choice_bool_text():
    assert check_choice("k", "a", ("a", "b")) == "a"
    assert check_bool("b", False) is False and check_bool("b", None, optional=True) is None
    assert check_text("s", "digits", "a data set") == "digits"
    for call in (lambda: check_choice("k", "c", ("a", "b")), lambda: check_choice("k", ["a"], ("a", "b")),
                 lambda: check_bool("b", 1), lambda: check_bool("b", None), lambda: check_text("s", "", "x"),
                 lambda: check_text("s", 3, "x")):
        with pytest.raises(ConfigError):
            call()


def test_message_style_names_the_flag():
    with pytest.raises(ConfigError) as e:
        check_int("SamplerConfig.steps", 0, 1, flag="--steps")
    assert str(e.value) == "--steps: expected an integer >= 1, got 0; fix: give an integer >= 1"
    with pytest.raises(ConfigError) as e:
        check_int("TrainConfig.batch_size", 0, 1, flag="--batch")
    assert str(e.value).startswith("--batch (batch_size): expected an integer >= 1, got 0; fix: ")
    with pytest.raises(ConfigError) as e:
        check_real("eta", 2.0, 0.0, 1.0, flag="--eta", fix="use 0 for DDIM")
    assert str(e.value) == "--eta: expected a finite number in [0.0, 1.0], got 2.0; fix: use 0 for DDIM"
    with pytest.raises(ConfigError) as e:
        check_choice("QuantConfig.method", "gptq", ("minmax", "mse"), flag="--method")
    assert str(e.value) == "--method: expected one of minmax, mse, got 'gptq'; fix: pick one of those"
    assert label("BrecqOptions.iters_w", "--option iters_w") == "--option iters_w"
    assert label("BrecqOptions.iters_w") == "BrecqOptions.iters_w"
    assert str(invalid("a.b", 1, "two", "add one")) == "a.b: expected two, got 1; fix: add one"
