"""The README's headless tutorial, word for word: its shell commands with the installed ``cspt2d`` command, and its
Python, run inside the project the commands made."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(after: str, language: str) -> str:
    """The first fenced ``language`` block after the text ``after`` in the README, verbatim."""
    text = README.read_text(encoding="utf-8")
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, text.index(after))
    assert match is not None, after
    return match.group(1)


@pytest.mark.slow
def test_headless_tutorial_runs_as_written(tmp_path, child_env):
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "cspt2d").is_file():
        pytest.skip(f"the cspt2d command is not installed beside {sys.executable} (pip install -e .)")
    env = {**child_env, "PATH": f"{bin_dir}:{child_env.get('PATH', '')}"}
    shell = subprocess.run(["bash", "-e", "-c", readme_block("### Headless, the seed's way", "bash")], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=600)
    assert shell.returncode == 0, shell.stderr[-3000:]
    assert re.search(r"^\s+2\s+\d+\.\d+ Å\s+\d+\.\d+ Å\s+\S+_r01_02_fsc\.png$", shell.stdout, re.M), shell.stdout
    assert "resolution at FSC 0.143" in shell.stdout  # the fsc line found the map the run wrote
    project = tmp_path / "demo-project"
    python = subprocess.run([sys.executable, "-c", readme_block("or from Python", "python")], cwd=project, env=env,
                            capture_output=True, text=True, timeout=600)
    assert python.returncode == 0, python.stderr[-3000:]
    maps = project / "frealign" / "maps"
    assert (maps / "sample_r01_02.mrc").is_file() and len(list((project / "frealign" / "scratch").glob(
        "sample_r01_region[0-9][0-9][0-9][0-9].cistem"))) == 40
