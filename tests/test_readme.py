"""The README's usage example runs as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "no python example in README.md"
    namespace = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["net"].params.shape == (64 * 32 + 32 + 32 * 10 + 10,)
    assert namespace["loss"] > 0


def test_readme_training_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)  # the checkpoint example writes run.fbp
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    namespace = {}
    for block in blocks:
        if "import torch" in block:
            try:
                import torch  # noqa: F401
            except ImportError:  # an optional package: run the rest of the block
                block = block[block.index("from sklearn"):]
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "run.fbp").exists()
    assert namespace["net"].score(namespace["X_test"], namespace["y_test"]) > 0.9
    assert len(namespace["history"].lr) == len(namespace["history"])
