"""Every relative link in the README and docs/ points at a file of the repository, and
every #anchor at a heading of its target (GitHub's rule for heading anchors); every
repository file and gbn_jax object that the pages or the source name exists."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    lines = page.read_text().splitlines()
    return {anchor(line.lstrip("#")) for line in lines if re.match(r"#{1,6} ", line)}


def test_github_anchor_rule_by_hand():
    assert anchor("What makes +RA work") == "what-makes-ra-work"
    assert anchor("The authors' protocol, switch by switch") == (
        "the-authors-protocol-switch-by-switch"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or (
            fragment and resolved.suffix == ".md" and fragment not in anchors(resolved)
        ):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


# Where prose names repository files or gbn_jax objects: the docs, the README and the
# source, except this file's own examples (experiments/results holds records of past
# runs, which name what existed then).
SOURCES = [
    *PAGES,
    *sorted(
        p
        for d in ("gbn_jax", "configs", "tests")
        for p in (ROOT / d).rglob("*.py")
        if p != Path(__file__).resolve()
    ),
    *sorted(p for p in (ROOT / "experiments").rglob("*.py") if "results" not in p.parts),
]
REPO_PATH = re.compile(r"\b(?:docs|experiments|configs|tests|gbn_jax)/[\w./-]+\.(?:md|py|png|json)")
DOTTED = re.compile(r"\bgbn_jax(?:\.[A-Za-z_]\w*)+")


def named_paths(text: str) -> set[str]:
    return set(REPO_PATH.findall(text))


def resolves(dotted: str) -> bool:
    """Whether ``gbn_jax.a.b.c`` is a module, or an attribute path from one."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_named_paths_and_objects_by_hand():
    assert named_paths("see docs/workdir.md and `experiments/bench/x.py`.") == {
        "docs/workdir.md",
        "experiments/bench/x.py",
    }
    assert resolves("gbn_jax.trainer.workdir.ALLOWED_CHANGES")
    assert not resolves("gbn_jax.trainer.train.XLA_CPU_FAST_OPTIONS")
    assert not resolves("gbn_jax.host_memory")


def test_every_named_file_and_object_exists():
    """Docstrings, comments and pages name files and objects that exist (not ones that
    moved, and nothing outside the repository)."""
    missing = []
    for source in SOURCES:
        text = source.read_text()
        rel = source.relative_to(ROOT)
        missing += [f"{rel}: {p}" for p in sorted(named_paths(text)) if not (ROOT / p).exists()]
        missing += [f"{rel}: {d}" for d in sorted(set(DOTTED.findall(text))) if not resolves(d)]
        if "paper-notes" in text:
            missing.append(f"{rel}: paper-notes (outside the repository)")
    assert not missing, missing
