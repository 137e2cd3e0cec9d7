"""The documentation says what the code does: every setting with its default, every problem type, every
module, and no link that leads nowhere."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
from helpers import ROOT

import errors
from settings import Settings

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", ROOT / "SECURITY.md", ROOT / "MIGRATION.md", ROOT / "examples" / "README.md"]
PAGES += sorted(DOCS.glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def _setting_rows() -> list[tuple[list[str], str]]:
    """(names, default cell) of every table row of docs/configuration.md that documents settings."""
    rows = []
    for line in (DOCS / "configuration.md").read_text().splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.split("|")[1:-1]]
            rows.append((re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0]), cells[1]))
    return rows


def _shown(value: object) -> str:
    """A default as a person writes it in the environment."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def _anchors(page: Path) -> set[str]:
    """The heading anchors of a Markdown page, as GitHub makes them."""
    text = FENCE.sub("", page.read_text())
    slugs = [
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", text, re.M)
    ]
    return set(slugs)


def test_configuration_documents_every_setting_once():
    """docs/configuration.md has one row for each field of `Settings`, and nothing else."""
    documented = [name for names, _ in _setting_rows() for name in names]
    assert len(documented) == len(set(documented)), sorted(n for n in documented if documented.count(n) > 1)
    assert set(documented) == {name.upper() for name in Settings.__struct_fields__}


def test_documented_defaults_are_the_defaults():
    """A default written as a literal (`30`, `false`, `mqtt,coap`) is the Struct's default."""
    defaults = {field.name.upper(): field.default for field in msgspec.structs.fields(Settings)}
    literal = [(names[0], cell[1:-1]) for names, cell in _setting_rows() if re.fullmatch(r"`[^`]*`", cell)]
    assert len(literal) > 30
    assert [(name, shown) for name, shown in literal if _shown(defaults[name]) != shown] == []


def test_relative_links_lead_to_files_and_headings():
    """Every relative link of README.md, SECURITY.md, MIGRATION.md, examples/README.md and docs/ names a file
    that exists, and a heading of that page when it has an anchor."""
    broken = []
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def test_every_problem_type_is_in_the_errors_table():
    """Each problem a client can receive has its row in docs/api.md."""
    never_answered = {"kafka-unavailable", "kafka-timeout"}  # Kafka's errors are answered 202 or 503 by the journal
    classes, slugs = [errors.PusherError], set()
    while classes:
        cls = classes.pop()
        slugs.add(cls.slug)
        classes += cls.__subclasses__()
    api = (DOCS / "api.md").read_text()
    assert sorted(slug for slug in slugs - never_answered if f"`/problems/{slug}`" not in api) == []


def test_layout_names_every_module():
    """docs/development.md, the one page that lists the modules, names every top-level module."""
    layout = (DOCS / "development.md").read_text()
    assert sorted(p.name for p in ROOT.glob("*.py") if f"`{p.name}`" not in layout) == []
