"""smile/runtime/engine.py refuses DeepSpeed versions outside the range its patches are tested on."""

from __future__ import annotations

import re

import pytest

from smile.runtime import engine


def _seen(monkeypatch, version):
    monkeypatch.setattr(engine, "_installed_deepspeed_version", lambda: version)


def test_range_constant_matches_pyproject():
    assert engine.DEEPSPEED_SPEC == "deepspeed>=0.19.8,<0.20"
    from pathlib import Path

    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"{engine.DEEPSPEED_SPEC}"' in pyproject


@pytest.mark.parametrize("version", ["0.19.8", "0.19.9", "0.19.8+cu124", "0.19.12"])
def test_supported_versions_pass(monkeypatch, version):
    _seen(monkeypatch, version)
    assert engine.check_deepspeed_version() == version


@pytest.mark.parametrize("version", ["0.15.0", "0.19.7", "0.20.0", "0.20", "1.0.0", "0.20.0rc1"])
def test_unsupported_versions_raise_one_line(monkeypatch, version):
    _seen(monkeypatch, version)
    with pytest.raises(engine.DeepSpeedVersionError) as info:
        engine.check_deepspeed_version()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"DeepSpeed {version} is installed but smile's runtime supports only deepspeed>=0.19.8,<0.20"
    )


def test_not_installed(monkeypatch):
    _seen(monkeypatch, None)
    with pytest.raises(engine.DeepSpeedVersionError, match=re.escape("needs deepspeed>=0.19.8,<0.20")):
        engine.check_deepspeed_version()


def test_explicit_version_argument():
    assert engine.check_deepspeed_version("0.19.8") == "0.19.8"
    with pytest.raises(engine.DeepSpeedVersionError, match=r"^DeepSpeed 0\.18\.0 is installed"):
        engine.check_deepspeed_version("0.18.0")


def test_fallback_parse_without_packaging(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_packaging(name, *args, **kwargs):
        if name == "packaging" or name.startswith("packaging."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_packaging)
    assert engine._release("0.19.8+cu124") == (0, 19, 8)
    assert engine.check_deepspeed_version("0.19.8") == "0.19.8"
    with pytest.raises(engine.DeepSpeedVersionError):
        engine.check_deepspeed_version("0.20.1")


def test_build_engine_checks_first(monkeypatch):
    _seen(monkeypatch, "0.21.0")
    with pytest.raises(engine.DeepSpeedVersionError, match="DeepSpeed 0.21.0 is installed"):
        engine.build_engine(None, None, {}, "gloo")


def test_installed_version_is_supported():
    """The environment the tests run in has a supported DeepSpeed (requirements-dev pins 0.19.8)."""
    engine.check_deepspeed_version()
