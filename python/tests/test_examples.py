"""The reference scenarios in examples/python run to the end against the
installed wheel, each on its own SQLite file, and exit 0 (each script
asserts its own outcome)."""

import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "python")


@pytest.mark.parametrize(
    "script, expect",
    [
        ("order_events.py", "courier emitted shipment.delivered"),
        ("delegation.py", "response event report.ready"),
        ("inventory_cancel.py", "watch and its scan cancelled"),
        ("tour.py", "shipped: {'label': 'LABEL-bolt', 'total': 10.0}\nbackordered: {'backordered': 3, 'supplier': 'on its way'}\naudit: ['LABEL-a', 'LABEL-b']\nscan: cancelled"),
        ("inventory_cancel.py", "order nut x3: check ended `out_of_stock` on attempt 2: {'backordered': 2, 'sku': 'nut'}"),
        ("inventory_cancel.py", "order bolt x4: check ended `ok` on attempt 2: {'shipped': 4, 'sku': 'bolt'}"),
    ],
)
def test_example_runs(tmp_path, script, expect):
    store = f"sqlite:{tmp_path / 'example.db'}"
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), "--store", store],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert expect in proc.stdout, out


def test_the_package_readme_shows_the_tour_as_it_runs():
    """python/README.md's complete worker is examples/python/tour.py, verbatim."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    with open(os.path.join(root, "examples", "python", "tour.py")) as f:
        tour = f.read()
    with open(os.path.join(root, "python", "README.md")) as f:
        readme = f.read()
    assert "```python\n" + tour + "```" in readme
