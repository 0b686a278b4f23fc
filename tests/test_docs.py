"""The README's supported-ops table is generated from the registry and must be current."""
from pathlib import Path

from graphprune.docs import update


def test_readme_ops_table_is_current():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert update(readme, check=True), "README ops table is stale: run `python -m graphprune.docs`"
