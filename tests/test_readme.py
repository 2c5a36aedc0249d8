"""The README's usage example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "no python example in README.md"
    namespace = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["net"].params.shape == (64 * 32 + 32 + 32 * 10 + 10,)
    assert namespace["loss"] > 0
