"""The zoo registry: each method of ``smile.models`` registers a :class:`ZooMethod` on import.

``smile.models`` (``models/__init__.py``) calls :func:`register` for each method with its name,
its job config class, its train and evaluate entry points (and optionally its ``cli`` module and
``configs/`` folder). Config classes and entry points are import paths
(``"package.module:attribute"``) so that registering imports nothing heavy;
:meth:`ZooMethod.load_train` and friends import them on use. A method outside the package
registers itself the same way.

:func:`resolve_config` is the one way a method's command line turns ``--config VALUE`` into a
file: an existing path, or the name of a file in the method's ``configs/`` folder.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

MODELS_DIR = Path(__file__).resolve().parent
CONFIG_SUFFIXES = (".yaml", ".yml", ".toml", ".json")  # what smile.runtime.load_config reads


class ZooError(ValueError):
    """An unknown zoo method or config name; the message is one line (``smile`` prints it as is)."""


def load_ref(ref: Any) -> Any:
    """``ref`` itself, or, for an import path ``"package.module:attribute"``, the object it names."""
    if not isinstance(ref, str):
        return ref
    module, sep, attribute = ref.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"import path {ref!r} is not of the form 'package.module:attribute'")
    obj: Any = importlib.import_module(module)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class ZooMethod:
    """One zoo method. ``config_class``, ``train`` and ``evaluate`` are the objects themselves or
    import paths (``"smile.models.lemda.job:train"``); ``train(config, ...)`` trains from a loaded
    config, ``evaluate(config, ...)`` scores a trained model. ``cli`` is the module path of the
    method's command line (``add_arguments(parser)``, ``main(args)``); ``configs_dir`` holds its
    bundled configs. Both default to the method's own package (``smile.models.<name>``)."""

    name: str
    config_class: type | str
    train: Callable[..., Any] | str
    evaluate: Callable[..., Any] | str | None = None
    cli: str = ""
    configs_dir: Path | None = None
    summary: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"zoo method name {self.name!r} is not a Python identifier")
        if not self.cli:
            object.__setattr__(self, "cli", f"smile.models.{self.name}.cli")
        configs = MODELS_DIR / self.name / "configs" if self.configs_dir is None else Path(self.configs_dir)
        object.__setattr__(self, "configs_dir", configs)

    def load_config_class(self) -> type:
        return load_ref(self.config_class)

    def load_train(self) -> Callable[..., Any]:
        return load_ref(self.train)

    def load_evaluate(self) -> Callable[..., Any] | None:
        return None if self.evaluate is None else load_ref(self.evaluate)

    def load_cli(self) -> ModuleType:
        return importlib.import_module(self.cli)

    def config_names(self) -> list[str]:
        """The bundled configs' names (file names without their suffix)."""
        return config_names(self)

    def resolve_config(self, value: str | Path | None) -> Path | None:
        return resolve_config(self, value)

    def load_config(self, value: str | Path | None, overrides: Iterable[str] = ()) -> Any:
        """The validated config from a path or bundled name (``None``: the class's defaults)."""
        from smile.runtime import load_config

        return load_config(self.load_config_class(), self.resolve_config(value), list(overrides))


_METHODS: dict[str, ZooMethod] = {}


def register(method: ZooMethod) -> ZooMethod:
    """Add ``method`` to the zoo (registering the same method again is a no-op)."""
    known = _METHODS.get(method.name)
    if known is not None and known != method:
        raise ValueError(f"zoo method {method.name!r} is already registered differently")
    _METHODS[method.name] = method
    return method


def _load_zoo() -> None:
    import smile.models  # noqa: F401  (its __init__ registers every method)


def available() -> list[str]:
    """The registered methods' names, sorted."""
    _load_zoo()
    return sorted(_METHODS)


def get(name: str) -> ZooMethod:
    """The method called ``name``; an unknown name raises :class:`ZooError` listing the allowed ones."""
    _load_zoo()
    try:
        return _METHODS[name]
    except KeyError:
        raise ZooError(f"unknown zoo method {name!r}; allowed: {', '.join(available())}") from None


def _method(method: ZooMethod | str) -> ZooMethod:
    return method if isinstance(method, ZooMethod) else get(method)


def config_names(method: ZooMethod | str) -> list[str]:
    """The names of ``method``'s bundled configs (``configs/<name>.yaml|.yml|.toml|.json``)."""
    folder = _method(method).configs_dir
    if folder is None or not folder.is_dir():
        return []
    return sorted({p.stem for p in folder.iterdir() if p.suffix in CONFIG_SUFFIXES and p.is_file()})


def resolve_config(method: ZooMethod | str, value: str | Path | None) -> Path | None:
    """``value`` as a config file: a path to an existing file, or a bundled config's name, with or
    without its suffix (``digits_tiny`` or ``digits_tiny.yaml`` in the method's ``configs/``).
    ``None`` stays ``None`` (the config class's defaults). Anything else raises :class:`ZooError`,
    one line naming the method, the value and the bundled configs."""
    zoo_method = _method(method)
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path
    folder = zoo_method.configs_dir
    if folder is not None and str(value) and path.name == str(value):  # a bare name, no folders
        names = [path.name] if path.suffix in CONFIG_SUFFIXES else [path.name + s for s in CONFIG_SUFFIXES]
        for name in names:
            if (folder / name).is_file():
                return folder / name
    bundled = ", ".join(config_names(zoo_method)) or "none"
    raise ZooError(
        f"zoo method {zoo_method.name!r}: no config file or bundled config {str(value)!r}; "
        f"bundled configs: {bundled}"
    )
