"""Layers import downward only: pd_core < pd_data < pd_model < pd_eval < flows, at top level and inside functions.

A lower layer that reaches up (even lazily, to dodge an import cycle) couples code that is meant to
be reusable to the code that uses it; the graph is read from the source, so nothing is imported.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from pd_data import annotate

LAYERS = {"pd_core": 0, "pd_data": 1, "pd_model": 2, "pd_eval": 3, "flows": 4}
ROOT = Path(__file__).resolve().parents[1]


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, at any depth; relative imports are
    resolved against `package`, the dotted name of the package the source file lives in."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
    return found


def layer_violations(root: Path) -> list[str]:
    """`file:line imports module` for every import of a higher layer's package under `root`."""
    out = []
    for top, layer in LAYERS.items():
        for path in sorted((root / top).rglob("*.py")):
            package = ".".join(path.relative_to(root).parent.parts)
            for line, name in imported_modules(path.read_text(), package):
                if LAYERS.get(name.split(".")[0], -1) > layer:
                    out.append(f"{path.relative_to(root)}:{line} imports {name}")
    return out


def test_layers_import_downward_only():
    violations = layer_violations(ROOT)
    assert not violations, "imports of a higher layer:\n" + "\n".join(violations)


def test_the_check_finds_an_upward_import(tmp_path):
    (tmp_path / "pd_data" / "sub").mkdir(parents=True)
    (tmp_path / "pd_model").mkdir()
    (tmp_path / "pd_data" / "sub" / "bad.py").write_text(
        "from . import sibling\nfrom .. import tasks\n\n\ndef f():\n    import pd_eval.store\n")
    (tmp_path / "pd_model" / "bad.py").write_text("from flows.cli import main\nfrom pd_data import tasks\n")
    assert layer_violations(tmp_path) == ["pd_data/sub/bad.py:6 imports pd_eval.store",
                                          "pd_model/bad.py:1 imports flows.cli"]
    assert imported_modules("from . import a\nfrom ..b import c\n", "pd_data.sub") == [(1, "pd_data.sub"),
                                                                                       (2, "pd_data.b")]


def test_importing_the_optional_backends_registers_nothing():
    code = ("import pd_data.annotators_ext, pd_data.annotate as a; "
            "assert set(dict(a.ANNOTATORS)) == {'procedural'}, set(a.ANNOTATORS)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_an_unknown_backend_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown annotator backend 'nope'; known: .*controlnet_aux.*procedural.*"
                                         "transformers"):
        annotate.get_annotator("nope", "canny")


@pytest.mark.parametrize("backend, module, package", [
    ("controlnet_aux", "pd_data.no_such_module", "controlnet-aux"),  # the module that registers it is gone
    ("no_such_package", "pd_data.annotators_ext", "no-such-package"),  # the package it needs is not installed
])
def test_a_missing_package_names_the_fix(backend, module, package, monkeypatch):
    monkeypatch.setitem(annotate.OPTIONAL_BACKENDS, backend, (module, package))
    monkeypatch.delitem(annotate.ANNOTATORS, backend, raising=False)
    annotate.get_annotator.cache_clear()  # an instance cached by another test would hide the error
    try:
        with pytest.raises(ImportError, match=f"backend '{backend}' needs the package '{package}'.*"
                                              f"`pip install {package}`"):
            annotate.get_annotator(backend, "canny")
    finally:
        annotate.get_annotator.cache_clear()
