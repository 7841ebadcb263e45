"""hookscope.plot: reachable as hs.plot, matplotlib imported only when a plot is drawn."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_hs_plot_needs_no_explicit_import_and_no_matplotlib_until_used():
    done = _run("import sys, hookscope as hs\n"
                "assert callable(hs.plot.similarity_heatmap)\n"
                "assert 'matplotlib' not in sys.modules\n"
                "from hookscope import plot\n"
                "assert plot is hs.plot\n"
                "try:\n    hs.no_such_thing\nexcept AttributeError as e:\n    print(e)\n")
    assert done.returncode == 0, done.stderr
    assert "no attribute 'no_such_thing'" in done.stdout


def test_without_matplotlib_a_plot_says_what_to_install():
    done = _run("import sys; sys.modules['matplotlib'] = None\n"
                "import numpy as np, hookscope as hs\n"
                "try:\n    hs.plot.similarity_heatmap(np.eye(2))\n"
                "except ImportError as e:\n    print(e)\n")
    assert done.returncode == 0, done.stderr
    assert "pip install" in done.stdout and "matplotlib" in done.stdout
