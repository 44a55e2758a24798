"""Documentation cannot rot: every sample-model example in README and docs/ is run."""

from __future__ import annotations

import glob
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flatcli.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_blocks(path: Path) -> list[tuple[str, str]]:
    text = path.read_text(encoding="utf-8")
    return re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)


def examples() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for _, block in code_blocks(path):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                for prefix in ("python -m flatcli ", "flatcli "):
                    if line.startswith(prefix) and "sample_models/" in line:
                        found.append((f"{path.name}: {line}", line[len(prefix) :]))
    return found


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    blocks = [b.strip() for lang, b in code_blocks(ROOT / "README.md") if lang == "bash"]
    assert ci in blocks, "the README's test command and .ci/run differ"
    assert "pytest" in ci and "flatcli measure sample_models/" in readme


@pytest.mark.parametrize(("where", "args"), examples(), ids=[e[0] for e in examples()])
def test_documented_example_runs(
    where: str, args: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sample_models").symlink_to(ROOT / "sample_models")
    monkeypatch.chdir(tmp_path)
    argv = []
    for arg in shlex.split(args):  # the shell would expand globs
        argv += sorted(glob.glob(arg)) if "*" in arg else [arg]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, f"{where}\n{result.output}"


def test_readme_python_example_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    blocks = [b for lang, b in code_blocks(ROOT / "README.md") if lang == "python"]
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - our own documentation


def doc_python_blocks() -> list[tuple[str, str]]:
    return [
        (path.name, block)
        for path in DOCS[1:]
        for lang, block in code_blocks(path)
        if lang == "python"
    ]


@pytest.mark.parametrize(
    ("where", "block"), doc_python_blocks(), ids=[b[0] for b in doc_python_blocks()]
)
def test_docs_python_example_runs(
    where: str, block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sample_models").symlink_to(ROOT / "sample_models")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, where, "exec"), {})  # noqa: S102 - our own documentation


def test_there_are_examples() -> None:
    assert len(examples()) >= 5
