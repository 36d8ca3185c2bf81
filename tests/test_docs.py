"""The docs: every tutorial executes (its Python blocks, top to bottom, in a fresh interpreter), the site builds with
`mkdocs build --strict` (warnings are errors), and no source file points to a MATH.md outside the repository."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def tutorial_code(path: Path) -> str:
    """The Python blocks of a Markdown tutorial, joined into one script."""
    blocks = _BLOCK.findall(path.read_text())
    if not blocks:
        raise ValueError(f"{path} has no ```python block")
    return "\n\n".join(blocks)


def test_tutorial_blocks_are_found():
    assert [p.name for p in TUTORIALS] == ["first-flow.md", "runs.md"]
    code = tutorial_code(DOCS / "tutorials" / "runs.md")
    assert "homflow.load_run" in code and "```" not in code


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_executes(path, tmp_path):
    script = tmp_path / f"{path.stem}.py"
    script.write_text(tutorial_code(path))
    env = {**os.environ, "MPLBACKEND": "Agg", "HOMFLOW_STORE": str(tmp_path / "runs")}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, f"tutorial {path.name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


@pytest.mark.slow
def test_docs_site_builds_strict(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    for page in ("index.html", "math/index.html", "api/flow/index.html", "tutorials/runs/index.html",
                 "papers/max-margin/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "api" / "flow" / "index.html").read_text()
    assert 'id="homflow.flow.gradient_flow"' in api  # the reference is generated from the docstrings


def test_no_reference_to_a_missing_math_file():
    """Docstrings cite docs/math.md (in the repository), and every section they cite exists there."""
    sections = {int(m) for m in re.findall(r"^## (\d+)\.", (DOCS / "math.md").read_text(), re.M)}
    stale, missing = [], []
    for f in sorted((ROOT / "src").rglob("*.py")):
        text = f.read_text()
        for m in re.finditer(r"(?<![\w/])MATH\.md", text):
            stale.append(f"{f.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}")
        for m in re.finditer(r"docs/math\.md,? (?:sections? |§§?)([\d ,and-]+)", text):
            for n in re.findall(r"\d+", m.group(1)):
                if int(n) not in sections:
                    missing.append(f"{f.relative_to(ROOT)}: section {n}")
    assert not stale, f"{len(stale)} references to MATH.md (not in the repository): {stale[:10]}"
    assert not missing, missing


def test_paper_pages_state_claim_command_and_figure():
    pages = sorted((DOCS / "papers").glob("*.md"))
    assert len(pages) >= 5
    for page in pages:
        text = page.read_text()
        assert "**Claim.**" in text, page.name
        assert re.search(r"arXiv \d{4}\.\d{5}", text), page.name
        images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
        for img in images:
            assert (page.parent / img).is_file(), (page.name, img)
        commands = re.findall(r"^homflow (?:reproduce|demo)\b.*$", text, re.M)
        if "no `homflow reproduce` built-in" not in text:  # a paper without a built-in says so
            assert commands and images, page.name


def test_the_documented_clarkeflow_signature_is_the_dataclass():
    """docs/nonsmooth.md lists every ``ClarkeFlow`` option with its default: the same names, in order, as the
    dataclass's fields, and the same defaults (``None (1000 eps)``-style notes after a default are allowed)."""
    import ast
    import dataclasses

    from homflow.flow import ClarkeFlow

    text = (DOCS / "nonsmooth.md").read_text()
    m = re.search(r"\* `ClarkeFlow\((.*?)\)`:", text, re.S)
    assert m, "no ClarkeFlow signature in docs/nonsmooth.md"
    documented = []
    for item in re.split(r",\s*", " ".join(m.group(1).split())):
        name, default = item.split("=", 1)
        documented.append((name.strip(), default.split(" (")[0].strip()))
    fields = [(f.name, f.default) for f in dataclasses.fields(ClarkeFlow)]
    assert [n for n, _ in documented] == [n for n, _ in fields]
    for (name, doc), (_, default) in zip(documented, fields):
        assert ast.literal_eval(doc) == default, (name, doc, default)
