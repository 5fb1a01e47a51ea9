"""The documentation cannot drift from the code: the generated references equal what the code generates,
every config key has a meaning, every relative link and anchor resolves, every test or benchmark a page
cites exists, and the architecture figure names real classes and functions."""
import importlib.util
import os
import re

import pytest

from helpers import REPO_ROOT

spec = importlib.util.spec_from_file_location("gen_reference", os.path.join(REPO_ROOT, "tools", "gen_reference.py"))
gen_reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen_reference)


def _pages():
    pages = [os.path.join(REPO_ROOT, n) for n in ("README.md", "CONTRIBUTING.md")]
    for folder, _, names in os.walk(os.path.join(REPO_ROOT, "docs")):
        pages += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".md")]
    return [p for p in pages if os.path.isfile(p)]


def _rel(path):
    return os.path.relpath(path, REPO_ROOT)


def _slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation but hyphens and underscores dropped, spaces to
    hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path):
    text = re.sub(r"```.*?```", "", open(path, encoding="utf-8").read(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_the_generated_references_are_up_to_date(capsys):
    assert gen_reference.main(["--check"]) == 0, capsys.readouterr().out


def test_every_config_key_has_a_meaning():
    comments = gen_reference.field_comments(os.path.join(REPO_ROOT, "upernet_vit", "config.py"))
    import dataclasses
    import typing

    missing = [f"{section}.{f.name}" for section, cls in gen_reference.SECTIONS for f in dataclasses.fields(cls)
               if not dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])
               and not comments.get((cls.__name__, f.name))]
    assert not missing, f"config keys without a comment in config.py (the reference's meaning): {missing}"


@pytest.mark.parametrize("page", _pages(), ids=_rel)
def test_links_resolve(page):
    text = re.sub(r"```.*?```", "", open(page, encoding="utf-8").read(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # a web address: not checked offline
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(resolved):
            broken.append(target)
        elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
            broken.append(target + " (no such heading)")
    assert not broken, f"{_rel(page)}: broken links {broken}"


@pytest.mark.parametrize("page", _pages(), ids=_rel)
def test_cited_tests_and_benchmarks_exist(page):
    text = open(page, encoding="utf-8").read()
    missing = []
    for path, name in re.findall(r"((?:tests|benchmarks|tools)/[\w/]+\.(?:py|sh))(?:::(\w+))?", text):
        full = os.path.join(REPO_ROOT, path)
        if not os.path.isfile(full):
            missing.append(path)
        elif name and not re.search(rf"def {name}\b", open(full, encoding="utf-8").read()):
            missing.append(f"{path}::{name}")
    assert not missing, f"{_rel(page)} cites what does not exist: {missing}"


def test_the_architecture_figure_names_real_code():
    page = os.path.join(REPO_ROOT, "docs", "explanation", "architecture.md")
    figure = re.search(r"```mermaid\n(.*?)```", open(page, encoding="utf-8").read(), flags=re.S)
    assert figure, "docs/explanation/architecture.md has no mermaid figure"
    source = ""
    for folder, _, names in os.walk(os.path.join(REPO_ROOT, "upernet_vit")):
        source += "".join(open(os.path.join(folder, n), encoding="utf-8").read() for n in names if n.endswith(".py"))
    names = set(re.findall(r"\b([A-Z][a-z]+(?:[A-Z][A-Za-z0-9]*)+)\b", figure.group(1)))  # CamelCase classes
    methods = set(re.findall(r"\b[A-Z]\w+\.([a-z_]+)\b", figure.group(1)))  # UperNetViT.crop
    identifiers = set(re.findall(r"\b([a-z]+(?:_[a-z0-9]+)+)\b", figure.group(1)))  # extract_feature_maps
    files = set(re.findall(r"\b([a-z_/]+\.py)\b", figure.group(1)))
    assert names and methods and identifiers, "the figure names no class, method or function"
    unknown = [n for n in names if not re.search(rf"(class|def) {n}\b", source)]
    unknown += [m for m in methods if not re.search(rf"def {m}\b", source)]
    unknown += [i for i in identifiers - files if not re.search(rf"\b{i}\b", source)]
    unknown += [f for f in files if not any(p.endswith(f) for p in _package_files())]
    assert not unknown, f"the architecture figure names what the code does not have: {unknown}"


def _package_files():
    for folder, _, names in os.walk(os.path.join(REPO_ROOT, "upernet_vit")):
        for n in names:
            yield os.path.join(folder, n)


def test_readme_stays_short():
    lines = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read().count("\n")
    assert lines <= 200, f"README.md has {lines} lines; its details belong in docs/"
