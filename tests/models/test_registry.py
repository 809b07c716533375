"""The zoo registry (``smile.models.registry``): every method registered, shared config resolution,
and ``smile zoo`` dispatching through it."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from smile.models import cli as zoo_cli
from smile.models import registry
from smile.models.registry import ZooError, ZooMethod
from smile.testing import child_env

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("lemda", "peft_design_spaces", "trap_replace")


def _smile(*argv: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in child_env(**env_vars).items() if k != "SMILE_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "smile.cli", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---- the registry --------------------------------------------------------------------------------------
def test_every_method_is_registered_with_a_config_class_and_callables():
    assert set(METHODS) <= set(registry.available())
    assert registry.available() == sorted(registry.available())
    for name in registry.available():
        method = registry.get(name)
        assert isinstance(method, ZooMethod) and method.name == name
        assert method.summary, name
        config_class = method.load_config_class()
        assert isinstance(config_class, type) and dataclasses.is_dataclass(config_class), name
        assert callable(method.load_train()), name
        assert method.evaluate is None or callable(method.load_evaluate()), name
        cli = method.load_cli()
        assert cli.__name__ == method.cli
        assert callable(cli.add_arguments) and callable(cli.main), name
        assert method.configs_dir.is_dir(), name


def test_train_entry_points_are_the_methods_own():
    from smile.models.lemda import job
    from smile.models.trap_replace import method as trap_method

    assert registry.get("lemda").load_train() is job.train
    assert registry.get("lemda").load_evaluate() is job.evaluate
    assert registry.get("trap_replace").load_train() is trap_method.train
    with pytest.raises(ValueError, match="stages must be 1 and/or 2"):
        trap_method.train(None, stages=(3,))


def test_importing_the_zoo_stays_light():
    code = "import sys, smile.models; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_unknown_method_is_one_line_naming_the_allowed_ones():
    with pytest.raises(ZooError) as err:
        registry.get("no_such_method")
    message = str(err.value)
    assert "\n" not in message and "'no_such_method'" in message
    assert all(name in message for name in METHODS)
    assert isinstance(err.value, ValueError)  # smile.cli prints ValueErrors as one line


def test_register_refuses_a_different_method_under_a_taken_name(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    lemda = registry.get("lemda")
    assert registry.register(lemda) is lemda
    with pytest.raises(ValueError, match="already registered"):
        registry.register(dataclasses.replace(lemda, train="smile.models.lemda.job:evaluate"))
    with pytest.raises(ValueError, match="not a Python identifier"):
        ZooMethod(name="no-dash", config_class=dict, train=print)


# ---- config resolution ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_bare_config_names_resolve_for_every_method(name):
    method = registry.get(name)
    names = method.config_names()
    assert names, f"{name} has no bundled configs"
    for config in names:
        path = registry.resolve_config(name, config)
        assert path.parent == method.configs_dir and path.stem == config and path.is_file()
        assert registry.resolve_config(method, path.name) == path  # with its suffix
        assert registry.resolve_config(method, str(path)) == path  # a path to an existing file
    assert registry.resolve_config(method, None) is None


@pytest.mark.parametrize("name", METHODS)
def test_bundled_configs_load_as_the_registered_config_class(name):
    method = registry.get(name)
    for config in method.config_names():
        assert isinstance(method.load_config(config), method.load_config_class()), config


def test_a_path_outside_the_configs_folder_resolves(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("seed: 1\n")
    assert registry.resolve_config("trap_replace", str(path)) == path
    assert registry.resolve_config("trap_replace", path) == path


def test_unknown_config_is_one_line_naming_method_value_and_configs(tmp_path):
    for name in METHODS:
        for value in ("no_such_config", "no_such_config.yaml", str(tmp_path / "missing.yaml")):
            with pytest.raises(ZooError) as err:
                registry.resolve_config(name, value)
            message = str(err.value)
            assert "\n" not in message
            assert f"'{name}'" in message and repr(value) in message
            assert all(config in message for config in registry.get(name).config_names())
    with pytest.raises(ZooError, match="unknown zoo method"):
        registry.resolve_config("no_such_method", "digits_tiny")


# ---- smile zoo -----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:  # a stand-in method CLI (see below)
    parser.add_argument("action", choices=("train",))
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")


def main(args: argparse.Namespace) -> int:
    registry.resolve_config("trap_replace", args.config)
    print(f"{args.action} {args.config} {' '.join(args.overrides)}")
    return 7


def test_zoo_cli_dispatches_through_the_registry(monkeypatch, capsys):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    registry.register(ZooMethod(name="stub", config_class=dict, train=print, cli=__name__, summary="stub"))
    assert "stub" in zoo_cli.available_methods()
    args = argparse.Namespace(method="stub", rest=["train", "a=1", "--config", "digits_tiny", "b=2"])
    assert zoo_cli.main(args) == 7
    assert capsys.readouterr().out == "train digits_tiny a=1 b=2\n"
    with pytest.raises(ZooError, match="unknown zoo method 'nope'; allowed: .*stub"):
        zoo_cli.main(argparse.Namespace(method="nope", rest=["train"]))


def test_smile_zoo_unknown_method_is_one_error_line():
    out = _smile("zoo", "no_such_method", "train")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("smile zoo: error: unknown zoo method 'no_such_method'")
    assert all(name in lines[0] for name in METHODS)


def test_smile_zoo_method_help():
    out = _smile("zoo", "trap_replace", "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: smile zoo trap_replace")
    assert "--stage" in out.stdout and "digits_tiny" in out.stdout


def test_smile_zoo_unknown_config_is_one_error_line():
    out = _smile("zoo", "trap_replace", "eval", "--config", "no_such_config")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "'trap_replace'" in lines[0] and "'no_such_config'" in lines[0] and "digits_tiny" in lines[0]


def test_smile_zoo_locked_run_dir_is_one_error_line(tmp_path, monkeypatch):
    from smile.runtime import lock

    run_dir = tmp_path / "run"
    monkeypatch.setenv("SMILE_JOB_ID", "a-live-job")
    held = lock.acquire(run_dir)  # this test process is the live holder
    try:
        argv = ("zoo", "lemda", "train", "--config", "wine_tiny", f"train.run_dir={run_dir}")
        out = _smile(*argv, SMILE_JOB_ID="another-job")
    finally:
        held.release()
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("smile zoo lemda: error: run dir ") and "'a-live-job'" in last, out.stderr
