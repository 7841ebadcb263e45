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


def test_plots_of_neighbourhood_change_and_their_bad_inputs():
    import numpy as np
    import pytest

    import hookscope as hs

    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    x = np.random.default_rng(0).normal(size=(12, 4))
    change = hs.neighborhood_change(x, x + 0.3 * x ** 2, k=3, labels=[f"s{i}" for i in range(12)])
    ax = hs.plot.overlap_histogram(change)
    assert sum(p.get_height() for p in ax.patches) == 12  # every item counted once
    ax = hs.plot.neighbor_diagram(change, "s0", before="b", after="a")
    texts = [t.get_text() for t in ax.texts]
    assert "b" in texts and "a" in texts and len(texts) == 2 + 2 * 3
    with pytest.raises(hs.InputError, match="not an item"):
        hs.plot.neighbor_diagram(change, "nope")
    with pytest.raises(hs.InputError, match="neighborhood_change"):
        hs.plot.overlap_histogram(change[["overlap"]])
    with pytest.raises(hs.InputError, match="3 labels for a matrix of 2 rows"):
        hs.plot.similarity_heatmap(np.eye(2), ["a", "b", "c"])


def test_heatmap_labels_every_row_and_scales_colours_to_the_data():
    import numpy as np
    import pytest

    import hookscope as hs

    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    m = np.array([[1.0, 0.3, 0.25], [0.3, 1.0, 0.5], [0.25, 0.5, 1.0]])
    ax = hs.plot.similarity_heatmap(m)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]  # not 0.0, 2.5
    assert ax.images[0].get_clim() == (0.25, 1.0)
    ax = hs.plot.similarity_heatmap(m - 0.5)
    assert ax.images[0].get_clim() == (-0.5, 0.5)  # both signs: centred on 0
