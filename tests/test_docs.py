"""The README's tables are generated from the code; run `python -m tests.test_docs` to rewrite them."""

from __future__ import annotations

import re
from pathlib import Path

from runner.errors import markdown_table
from runner.settings import variables

README = Path(__file__).resolve().parent.parent / "README.md"


def variables_table() -> str:
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, default, meaning in variables():
        lines.append(f"| `{name}` | {f'`{default}`' if default else ''} | {meaning} |")
    return "\n".join(lines)


SECTIONS = {"variables": variables_table, "exit-codes": markdown_table}


def section(text: str, name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
    assert match, f"README has no {name} section"
    return match.group(1)


def test_readme_variables_table_matches_settings():
    assert section(README.read_text(), "variables") == variables_table()


def test_readme_exit_code_table_matches_errors():
    assert section(README.read_text(), "exit-codes") == markdown_table()


def test_help_lists_every_variable_and_exit_code():
    import subprocess

    from .conftest import RUNNER

    proc = subprocess.run([RUNNER, "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    for name, _, _ in variables():
        assert name in proc.stdout
    assert "| 143 |" in proc.stdout and "| 7 |" in proc.stdout and "-x KEY=VALUE" in proc.stdout


if __name__ == "__main__":
    text = README.read_text()
    for name, render in SECTIONS.items():
        text = text.replace(section(text, name), render())
    README.write_text(text)
