"""Import-direction contracts between smile's packages (see docs/architecture.md).

Every ``import`` / ``from ... import`` statement anywhere in a file (module level, inside
functions, under ``try`` or ``if TYPE_CHECKING``) is parsed with :mod:`ast`; relative imports are
resolved against the file's own module name, and files under ``models/`` are named
``smile.models.<...>`` (that is where setuptools installs them).

``from X import a`` counts as importing ``X.a``: ``a`` may be a submodule (``from smile import
models``), and a module-prefix rule on ``X.a`` is the same as on ``X`` otherwise.
Dynamic imports (``importlib.import_module``) are not seen.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = frozenset(sys.stdlib_module_names)
CORE_THIRD_PARTY = frozenset({"torch", "triton", "numpy"})


@dataclass(frozen=True)
class Import:
    line: int
    module: str  # the absolute module name imported (``X.a`` for ``from X import a``)
    statement: str  # the statement as written


@dataclass(frozen=True)
class Contract:
    """``scope`` packages may not import ``forbidden`` packages (or only ``allowed`` ones)."""

    name: str
    scope: tuple[str, ...]
    forbidden: tuple[str, ...] = ()
    allowed: tuple[str, ...] | None = None  # smile packages allowed; non-smile: stdlib + core deps
    description: str = field(default="", compare=False)

    def applies_to(self, module: str) -> bool:
        return any(_within(module, pkg) for pkg in self.scope)

    def breaks(self, imported: str) -> bool:
        if any(_within(imported, pkg) for pkg in self.forbidden):
            return True
        if self.allowed is None:
            return False
        top = imported.split(".")[0]
        if top != "smile":
            return top not in STDLIB and top not in CORE_THIRD_PARTY
        return not any(_within(imported, pkg) for pkg in self.allowed)


CONTRACTS = (
    Contract(
        "a-core-is-self-contained",
        scope=("smile.moe",),
        allowed=("smile.moe",),
        description="smile.moe imports only the stdlib, torch, triton, numpy and smile.moe.*",
    ),
    Contract(
        "b-runtime-no-zoo-no-pretrain",
        scope=("smile.runtime",),
        forbidden=("smile.models", "smile.pretrain"),
        description="smile.runtime never imports smile.models or smile.pretrain",
    ),
    Contract(
        "c-zoo-no-pretrain",
        scope=("smile.models",),
        forbidden=("smile.pretrain",),
        description="models/ (smile.models) never imports smile.pretrain",
    ),
    Contract(
        "d-library-no-zoo",
        scope=("smile.moe", "smile.hf", "smile.runtime"),
        forbidden=("smile.models",),
        description="smile.moe, smile.hf and smile.runtime never import smile.models",
    ),
    Contract(
        "e-hf-no-runtime",
        scope=("smile.hf",),
        forbidden=("smile.runtime", "smile.pretrain", "smile.models"),
        description="smile.hf imports nothing from smile.runtime, smile.pretrain, smile.models",
    ),
)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def module_name(path: Path, root: Path = ROOT) -> str:
    """``smile/moe/layer.py`` -> ``smile.moe.layer``; ``models/x/__init__.py`` -> ``smile.models.x``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] == "models":
        parts = ["smile", *parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, *, is_package: bool = False) -> list[Import]:
    """Every import in ``source`` (of module ``module``), as absolute module names."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            text = ast.unparse(node)
            found += [Import(node.lineno, alias.name, text) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            text = ast.unparse(node)
            if node.level:
                base_parts = package.split(".") if package else []
                if node.level - 1 > len(base_parts):
                    raise ValueError(f"{module}:{node.lineno}: relative import beyond the top: {text}")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                target = base if alias.name == "*" else f"{base}.{alias.name}" if base else alias.name
                found.append(Import(node.lineno, target, text))
    return sorted(found, key=lambda imp: imp.line)


def violations(contract: Contract, source: str, module: str, where: str, *, is_package: bool = False):
    """``where:line: statement (imports X)`` for each import in ``source`` that breaks ``contract``."""
    if not contract.applies_to(module):
        return []
    return [
        f"{where}:{imp.line}: {imp.statement}  (imports {imp.module})"
        for imp in imports_of(source, module, is_package=is_package)
        if contract.breaks(imp.module)
    ]


def source_files() -> list[Path]:
    files = []
    for top in ("smile", "models"):
        files += [p for p in sorted((ROOT / top).rglob("*.py")) if "__pycache__" not in p.parts]
    return files


FILES = source_files()


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.name)
def test_import_contract(contract: Contract):
    in_scope = [p for p in FILES if contract.applies_to(module_name(p))]
    assert in_scope, f"{contract.name}: no files found in {contract.scope}"
    offenders = []
    for path in in_scope:
        offenders += violations(
            contract,
            path.read_text(encoding="utf-8"),
            module_name(path),
            str(path.relative_to(ROOT)),
            is_package=path.name == "__init__.py",
        )
    assert not offenders, f"{contract.description}; offending imports:\n" + "\n".join(offenders)


# Each contract must catch a violation: (module the source is in, violating source, clean source).
SYNTHETIC = {
    "a-core-is-self-contained": (
        "smile.moe.layer",
        "import torch\n\ndef f():\n    from smile.runtime import Trainer\n",
        "import os\nimport numpy as np\nimport torch\n"
        "from . import routing\nfrom smile.moe.config import X\n",
    ),
    "b-runtime-no-zoo-no-pretrain": (
        "smile.runtime.trainer",
        "import torch\nfrom ..pretrain import job\n",
        "from smile.moe import collect_aux_loss\nfrom .config import TrainConfig\n",
    ),
    "c-zoo-no-pretrain": (
        "smile.models.lemda.job",
        "def run():\n    import smile.pretrain.model\n",
        "from smile.runtime import Trainer\nfrom ..lemda import config\n",
    ),
    "d-library-no-zoo": (
        "smile.hf.moefy",
        "try:\n    from smile import models\nexcept ImportError:\n    pass\n",
        "from smile.moe import MoEConfig\n",
    ),
    "e-hf-no-runtime": (
        "smile.hf.switch",
        "from smile.runtime.checkpoint import MANIFEST\n",
        "from smile.moe import MoEConfig\nfrom .moefy import moefy\n",
    ),
}


def test_every_contract_has_a_synthetic_case():
    assert set(SYNTHETIC) == {c.name for c in CONTRACTS}


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.name)
def test_contract_catches_violation(contract: Contract):
    module, bad, good = SYNTHETIC[contract.name]
    found = violations(contract, bad, module, "synthetic.py")
    assert len(found) == 1, found
    assert found[0].startswith("synthetic.py:")
    assert violations(contract, good, module, "synthetic.py") == []
    # Out of scope, the same source is not this contract's business.
    assert violations(contract, bad, "smile.sim.cluster", "other.py") == []


def test_core_rejects_other_third_party_and_smile_root():
    core = CONTRACTS[0]
    src = "import transformers\nimport smile\nfrom smile import _C\nimport deepspeed.comm\n"
    found = violations(core, src, "smile.moe.kernels.cuda", "k.py")
    assert [line.split(":")[1] for line in found] == ["1", "2", "3", "4"]


def test_module_names_and_relative_imports():
    assert module_name(ROOT / "models/lemda/job.py") == "smile.models.lemda.job"
    assert module_name(ROOT / "models/__init__.py") == "smile.models"
    assert module_name(ROOT / "smile/moe/kernels/__init__.py") == "smile.moe.kernels"
    got = imports_of(
        "from . import cuda\nfrom ..routing import Router\n", "smile.moe.kernels", is_package=True
    )
    assert [i.module for i in got] == ["smile.moe.kernels.cuda", "smile.moe.routing.Router"]
    got = imports_of("from ...pretrain import job\n", "smile.models.lemda.cli")
    assert [i.module for i in got] == ["smile.pretrain.job"]
