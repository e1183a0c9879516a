"""Citations of the design (issue 23). The design the code cites is docs/design.md, in this repository: no file
may cite the sections of a design document that is not here (the former out-of-repo "DESIGN 4.3" style), and
every `docs/design.md#anchor` (or `design.md#anchor` between the docs, or `docs/design.md, 'Section name'`) must
name a heading of docs/design.md. Plain text scans, no torch."""

import re
from pathlib import Path

from helpers import ROOT

DESIGN = ROOT / "docs" / "design.md"
SCANNED = (
    "hope_kernels",
    "csrc",
    "tests",
    "benchmarks",
    "docs",
    "examples",
    "configs",
    "README.md",
    "setup.py",
    "CMakeLists.txt",
    "pyproject.toml",
)
TEXT_SUFFIXES = {".py", ".cpp", ".h", ".cu", ".cuh", ".md", ".sh", ".yaml", ".yml", ".txt", ".toml"}

# The old citations: "DESIGN 4.3", "DESIGN 8's", "shared/DESIGN.md", "(... of DESIGN)". Upper case and a whole
# word, so `docs/design.md` and names like `test_every_design_subcommand_is_there` do not match.
STALE = re.compile(r"\bDESIGN\b")
ANCHOR = re.compile(r"design\.md#([A-Za-z0-9_-]+)")
QUOTED = re.compile(r"design\.md,?\s+[\"'`]([^\"'`\n]+)[\"'`]")

# Files allowed to cite the old sections for a while (a change in flight elsewhere); the test below fails when an
# entry no longer needs it.
PENDING: set[str] = set()


def _files():
    for name in SCANNED:
        p = ROOT / name
        paths = [p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else []
        for f in paths:
            if (
                f.is_file()
                and f.suffix in TEXT_SUFFIXES
                and "__pycache__" not in f.parts
                and f.resolve() != Path(__file__).resolve()
            ):
                yield f


def _rel(f: Path) -> str:
    return f.relative_to(ROOT).as_posix()


def _lines(f: Path):
    return f.read_text(encoding="utf-8", errors="replace").splitlines()


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings() -> dict[str, str]:
    """{anchor: heading text} of docs/design.md (lines in code fences are not headings)."""
    out, fenced = {}, False
    for line in _lines(DESIGN):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            text = line.lstrip("#").strip()
            out[_slug(text)] = text
    return out


def stale_citations() -> dict[str, list[str]]:
    """{file: ["line: text", ...]} for every mention of the out-of-repo design."""
    out = {}
    for f in _files():
        hits = [f"{i}: {line.strip()}" for i, line in enumerate(_lines(f), 1) if STALE.search(line)]
        if hits:
            out[_rel(f)] = hits
    return out


def design_citations() -> list[tuple[str, int, str, str]]:
    """[(file, line, "anchor" | "name", value)] for every citation of a docs/design.md section."""
    out = []
    for f in _files():
        for i, line in enumerate(_lines(f), 1):
            out += [(_rel(f), i, "anchor", a) for a in ANCHOR.findall(line)]
            out += [(_rel(f), i, "name", n) for n in QUOTED.findall(line)]
            if f == DESIGN:  # links inside the page: [text](#anchor)
                out += [(_rel(f), i, "anchor", a) for a in re.findall(r"\]\(#([A-Za-z0-9_-]+)\)", line)]
    return out


def test_design_doc_is_in_the_repository():
    assert DESIGN.is_file()
    assert len(_headings()) >= 10


def test_no_citation_of_the_out_of_repo_design():
    stale = {f: hits for f, hits in stale_citations().items() if f not in PENDING}
    assert not stale, (
        "these cite sections of a design document that is not in the repository; cite "
        "docs/design.md#<section> (or the docs/*.md page that holds the content) instead:\n"
        + "\n".join(f"{f}:{h}" for f, hits in stale.items() for h in hits)
    )


def test_pending_files_still_need_their_fix():
    stale = stale_citations()
    done = sorted(f for f in PENDING if f not in stale)
    assert not done, f"no old citation left in {done}: remove them from PENDING in tests/app/test_docs.py"


def test_every_cited_design_section_exists():
    headings = _headings()
    names = {t.lower() for t in headings.values()}
    cited = design_citations()
    assert len(cited) >= 20, f"only {len(cited)} citations of docs/design.md found: is the scan broken?"
    missing = [
        f"{f}:{i}: {kind} {value!r}"
        for f, i, kind, value in cited
        if (value not in headings if kind == "anchor" else value.strip().lower() not in names)
    ]
    assert not missing, (
        "these cite a section that docs/design.md does not have (its anchors: "
        f"{sorted(headings)}):\n" + "\n".join(missing)
    )


def test_design_doc_links_resolve():
    """Every relative link of docs/design.md names a file that exists."""
    links = [m for line in _lines(DESIGN) for m in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", line) if "://" not in m]
    assert links
    missing = [m for m in links if not (DESIGN.parent / m).exists()]
    assert not missing, f"docs/design.md links to missing files: {missing}"
