"""The docs stay true: every Python snippet in README.md and docs/ runs, and troubleshooting quotes messages the code
still prints.

Snippets. Each ```python block is run as a script in its own process, from a folder laid out like a checkout beside
../shared (`engines/` is the TinyPose engine dir the README's offline commands make, `examples/` the repo's), so a
snippet uses the paths the README's commands use. A block that needs what a test cannot have says so on the line
before it:

    <!-- snippet needs: a CUDA GPU and a checkpoint download -->

Such a block is not run, but its imports are: an API it names that no longer exists still fails here.

Troubleshooting. Every `error:` / `warning:` line quoted in docs/troubleshooting.md must be covered, for at least
60% of its text (leaving out the example's paths and values), by the fixed parts of string literals in dynpose's
source (f-string fields are where the quoted message has your paths and values).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NEEDS = re.compile(r"<!--\s*snippet needs:\s*(.+?)\s*-->\s*$")


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int
    code: str
    needs: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def snippets() -> list[Snippet]:
    out = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                start = i + 1
                end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
                prev = lines[i - 1] if i else ""
                m = NEEDS.search(prev)
                out.append(Snippet(doc, start, "\n".join(lines[start:end]) + "\n", m.group(1) if m else None))
                i = end
            i += 1
    return out


SNIPPETS = snippets()


def test_snippets_are_found() -> None:
    assert len(SNIPPETS) >= 10 and any(s.needs is None for s in SNIPPETS)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_snippet_imports_exist(snippet: Snippet) -> None:
    """Every snippet parses and every name it imports from dynpose exists (cheap; in this process)."""
    tree = ast.parse(snippet.code, filename=snippet.id)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dynpose"):
            mod = __import__(node.module, fromlist=["_"])
            missing = [a.name for a in node.names if not hasattr(mod, a.name)]
            assert not missing, f"{snippet.id}: {node.module} has no {missing}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("dynpose"):
                    __import__(a.name)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory, tinypose_engine_dir: Path, shared: Path) -> Path:
    """A folder laid out like the repository root after the README's offline export: engines/, examples/,
    ../shared."""
    root = tmp_path_factory.mktemp("docs")
    work = root / "repo"
    work.mkdir()
    (root / "shared").symlink_to(shared)
    (work / "engines").symlink_to(tinypose_engine_dir)
    (work / "examples").symlink_to(REPO / "examples")
    return work


RUNNABLE = [s for s in SNIPPETS if s.needs is None]


@pytest.mark.parametrize("snippet", RUNNABLE, ids=[s.id for s in RUNNABLE])
def test_snippet_runs(snippet: Snippet, checkout: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", snippet.code], cwd=checkout, env=env, capture_output=True, text=True, timeout=300
    )
    tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
    assert r.returncode == 0, (
        f"{snippet.id} fails (fix it, or mark what it needs with `<!-- snippet needs: ... -->` on the line before "
        f"its fence):\n{tail}"
    )


def test_marked_snippets_say_what_they_need() -> None:
    for s in SNIPPETS:
        assert s.needs is None or len(s.needs) >= 5, f"{s.id}: say what the snippet needs"


# -- troubleshooting -------------------------------------------------------------------------------------------------
def _source_pieces() -> list[str]:
    """The fixed text of every string literal in dynpose (f-strings split at their fields), 8 characters or more."""
    pieces: set[str] = set()
    for path in (REPO / "dynpose").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                parts = [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                parts = [node.value]
            else:
                continue
            # %-style log messages ("skipping %s (%d skipped so far)", "after %g s") split at their fields too
            split = (q.strip() for p in parts for q in re.split(r"%[-.\d]*[sdrfg]", p))
            pieces.update(q for q in split if len(q) >= 8)
    return sorted(pieces, key=len, reverse=True)


def quoted_messages() -> list[str]:
    text = (REPO / "docs" / "troubleshooting.md").read_text()
    out = []
    for block in re.findall(r"```\n(.*?)```", text, re.S):
        out += [ln.strip() for ln in block.splitlines() if ln.strip().startswith(("error:", "warning:"))]
    return out


MESSAGES = quoted_messages()


def coverage(message: str, pieces: list[str]) -> float:
    body = message.split(":", 1)[1].strip()
    covered = [False] * len(body)
    for p in pieces:
        for m in re.finditer(re.escape(p), body):
            covered[m.start() : m.end()] = [True] * len(p)
    # the example's values (paths, hashes, versions, numbers) are not what the code fixes: leave them out
    value = [False] * len(body)
    for m in re.finditer(r"\S*[\d/._<>]\S*", body):
        value[m.start() : m.end()] = [True] * (m.end() - m.start())
    fixed = [c for c, ch, v in zip(covered, body, value, strict=True) if not ch.isspace() and not v]
    return sum(fixed) / max(1, len(fixed))


def test_troubleshooting_quotes_messages_the_code_prints() -> None:
    assert len(MESSAGES) >= 20
    pieces = _source_pieces()
    stale = [f"{coverage(m, pieces):.0%}  {m}" for m in MESSAGES if coverage(m, pieces) < 0.6]
    assert not stale, "docs/troubleshooting.md quotes messages the code no longer prints:\n" + "\n".join(stale)


def test_one_version() -> None:
    """pyproject's version is the one `dynpose --version`, the demo's cache key and the manifests carry."""
    import dynpose

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    match = re.search(r'^version = "([^"]+)"', text, re.MULTILINE)
    assert match is not None and match.group(1) == dynpose.__version__
