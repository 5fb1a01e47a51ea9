"""The package's layers, held by its imports (DESIGN.md, "Package layout"): the model core imports none of
the pipeline around it; data <- inference <- training; runs/ serves training, inference and export and
imports none of them. Every import counts, those inside functions too."""
import ast
import pathlib

import pytest

import upernet_vit

PACKAGE = pathlib.Path(upernet_vit.__file__).parent
CORE = {"ppm", "fpn", "head", "vit_adapter", "upsampler", "layers", "model"}
PIPELINE = {"data", "inference", "runs", "training", "cli", "integrations", "fast", "export"}

# part -> the parts of the package it may not import
FORBIDDEN = {
    **{core: PIPELINE for core in CORE},
    "data": {"inference", "runs", "training", "cli", "integrations", "export", "fast"},
    "inference": {"training", "cli", "integrations"},
    "runs": {"data", "inference", "training", "cli", "integrations", "export", "fast"},
    "training": {"cli", "integrations"},
}


def _imported_parts(path: pathlib.Path) -> dict:
    """``{part of upernet_vit: line}`` for every import in ``path`` (relative ones resolved)."""
    module = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = module[:-1]  # a module's package (an __init__.py's is its own folder)
    found = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            target = list(base) + (node.module.split(".") if node.module else [])
            names = [target + [alias.name] for alias in node.names] if node.level and not node.module else [target]
        elif isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
        else:
            continue
        for name in names:
            if len(name) > 1 and name[0] == "upernet_vit":
                found.setdefault(name[1], node.lineno)
    return found


def _part(path: pathlib.Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_the_resolver_sees_relative_absolute_and_lazy_imports():
    parts = _imported_parts(PACKAGE / "inference" / "predict.py")
    assert {"data", "runs", "devices", "fast", "model", "inference"} <= set(parts)  # ..fast is imported lazily
    assert "backbones" in _imported_parts(PACKAGE / "model.py")


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_each_part_imports_only_what_lies_below_it(part):
    files = sorted(PACKAGE.glob(f"{part}/**/*.py")) if (PACKAGE / part).is_dir() else [PACKAGE / f"{part}.py"]
    assert files
    broken = [f"{f.relative_to(PACKAGE)}:{line} imports upernet_vit.{target}"
              for f in files for target, line in _imported_parts(f).items()
              if target in FORBIDDEN[part] and target != _part(f)]
    assert not broken, "\n".join(broken)
