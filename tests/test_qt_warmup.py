"""The numba kernels' warm-up: a child process compiles them into numba's cache, the window's process only loads them,
and a run started before they are loaded waits for them (with progress) instead of compiling them itself.

Run under pytest-xvfb (``QT_QPA_PLATFORM=offscreen`` does not work for a napari Viewer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_cspt2d._qt import _warmup  # noqa: E402
from napari_cspt2d._qt._loader import add_layers  # noqa: E402
from napari_cspt2d._qt._warmup import KERNELS_STAGE, KernelWarmer  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"

#: A stand-in for the compiling child: it only sleeps (the kernels are loaded in this process afterwards).
SLEEPING_CHILD = ("-c", "import time; time.sleep({})")

#: Loads the kernels in a fresh interpreter and prints numba's cache hits and misses over every kernel.
_COUNT_LOADS = """
import json
from numba.core.registry import CPUDispatcher
from napari_cspt2d.recon import backproject, ctf, extract, refine
from napari_cspt2d.recon.warmup import warm_kernels
warm_kernels()
kernels = {f"{m.__name__}.{n}": f for m in (backproject, ctf, extract, refine) for n, f in vars(m).items()
           if isinstance(f, CPUDispatcher)}
print(json.dumps({name: [sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values())]
                  for name, f in kernels.items() if f.signatures}))
"""


@pytest.mark.slow
def test_the_child_compiles_into_numbas_cache_and_the_window_only_loads(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"),
               PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, *_warmup.CHILD_ARGS], env=env, check=True, timeout=600)
    assert list((tmp_path / "numba").rglob("*.nbi")), "the child wrote no cache index"
    out = subprocess.run([sys.executable, "-c", _COUNT_LOADS], env=env, check=True, timeout=600,
                         capture_output=True, text=True).stdout
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts, "no kernel was used"
    missed = {name: c for name, c in counts.items() if c[1]}
    assert not missed, f"compiled again instead of loaded from the child's cache: {missed}"
    assert all(hits > 0 for hits, _ in counts.values())


def _open_run(make_napari_viewer, layers, qtbot):
    viewer = make_napari_viewer(show=True)
    add_layers(viewer, layers)
    _, cockpit = viewer.window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    qtbot.waitUntil(lambda: cockpit.warmer.is_ready, timeout=600_000)  # the real warm-up, first
    cockpit.show_tab("Run")
    return cockpit.run


@pytest.mark.gui
@pytest.mark.usefixtures("cache_home")
def test_a_run_started_before_the_kernels_are_loaded_waits_and_makes_the_same_map(
        make_napari_viewer, sample_layers, qtbot, monkeypatch):
    run = _open_run(make_napari_viewer, sample_layers, qtbot)
    run.reconstruct_button.click()
    qtbot.waitUntil(lambda: not run.busy, timeout=120_000)
    assert run.state == "done", run.log_view.toPlainText()
    before = np.array(run.results[-1].map.volume)

    late = KernelWarmer(SLEEPING_CHILD[:1] + (SLEEPING_CHILD[1].format(2),))  # loaded ~2 s from now
    monkeypatch.setattr(_warmup, "_WARMER", late)
    seen: list[tuple[str, bool]] = []  # (stage, kernels loaded when it arrived)
    run._relay.progress.connect(lambda stage, *_: seen.append((stage, late.is_ready)))
    texts: list[str] = []
    run._relay.progress.connect(lambda *_: texts.append(run.stage_label.text()))
    run.reconstruct_button.click()
    qtbot.waitUntil(lambda: bool(seen), timeout=5_000)
    assert seen[0] == (KERNELS_STAGE, False) and not late.is_ready and run.busy  # progress at once, waiting
    qtbot.waitUntil(lambda: not run.busy, timeout=120_000)
    assert run.state == "done", run.log_view.toPlainText()
    assert late.child_ok and late.is_ready
    assert any("preparing the kernels" in t for t in texts)
    working = [ready for stage, ready in seen if stage != KERNELS_STAGE]
    assert working and all(working), seen  # nothing was extracted or inserted before the kernels were loaded
    np.testing.assert_array_equal(np.array(run.results[-1].map.volume), before)


@pytest.mark.gui
@pytest.mark.usefixtures("cache_home")
def test_a_reconstruct_needs_only_the_reconstructions_piece(make_napari_viewer, sample_layers, qtbot, monkeypatch):
    """The child says "reconstruct" when those kernels are in the cache: a Reconstruct goes on while it compiles
    the refinement's."""
    run = _open_run(make_napari_viewer, sample_layers, qtbot)
    late = KernelWarmer(("-c", "import time; time.sleep(1); print('reconstruct', flush=True); time.sleep(60)"))
    monkeypatch.setattr(_warmup, "_WARMER", late)
    try:
        seen: list[tuple[str, bool]] = []
        run._relay.progress.connect(lambda stage, *_: seen.append((stage, late.loaded("reconstruct"))))
        run.reconstruct_button.click()
        qtbot.waitUntil(lambda: not run.busy, timeout=120_000)
        assert run.state == "done", run.log_view.toPlainText()
        assert seen[0] == (KERNELS_STAGE, False)
        assert all(ready for stage, ready in seen if stage != KERNELS_STAGE)
        assert late.loaded("reconstruct") and not late.loaded("refine") and not late.is_ready
        assert late.child_ok is None  # the child still "compiles" the refinement's piece
    finally:
        late.stop()


def test_the_pieces_are_the_children():
    from napari_cspt2d.recon import warmup

    assert _warmup.PIECES == warmup.PIECES


@pytest.mark.gui
@pytest.mark.usefixtures("cache_home")
def test_cancel_while_the_kernels_are_prepared_ends_the_run(make_napari_viewer, sample_layers, qtbot, monkeypatch):
    run = _open_run(make_napari_viewer, sample_layers, qtbot)
    late = KernelWarmer(SLEEPING_CHILD[:1] + (SLEEPING_CHILD[1].format(60),))
    monkeypatch.setattr(_warmup, "_WARMER", late)
    try:
        run.reconstruct_button.click()
        qtbot.waitUntil(lambda: "preparing the kernels" in run.stage_label.text(), timeout=5_000)
        run.cancel_button.click()
        qtbot.waitUntil(lambda: not run.busy, timeout=10_000)
        assert run.state == "cancelled" and not run.results and not late.is_ready
    finally:
        late.stop()


@pytest.mark.gui
def test_a_piece_waits_while_gui_work_is_staged_unless_a_run_waits_for_it(qtbot, monkeypatch):
    """The child says a piece is ready while a series' layers are being shown (staged GUI work): it is loaded once
    that work is done, not during it; a run that waits for a piece has it loaded at once."""
    import threading

    from napari_cspt2d._qt import _stages

    loads: list[tuple[str, int]] = []  # (piece, staged steps pending when its loading started)
    monkeypatch.setattr(_warmup, "_warm_kernels", lambda piece: loads.append((piece, _stages.pending())))
    staging = [True]

    def step() -> None:  # GUI work staged, step after step, while ``staging``
        if staging[0]:
            _stages.in_own_turn(step)

    _stages.in_own_turn(step)
    warmer = KernelWarmer(("-c", "print('reconstruct', flush=True); import time; time.sleep(60)"))
    try:
        qtbot.waitUntil(lambda: "reconstruct" in warmer._asked, timeout=10_000)
        qtbot.wait(3 * _warmup.LOAD_RETRY_MS)
        assert not loads and not warmer.loaded("reconstruct")
        staging[0] = False
        qtbot.waitUntil(lambda: warmer.loaded("reconstruct"), timeout=5_000)
        assert loads == [("reconstruct", 0)]

        staging[0] = True  # the refinement's piece, asked while GUI work is staged, but a run waits for it
        _stages.in_own_turn(step)
        run = threading.Thread(target=warmer.wait, args=("refine", 10.0))
        run.start()
        warmer._load("refine")
        qtbot.waitUntil(lambda: warmer.loaded("refine"), timeout=5_000)
        assert loads[1][0] == "refine" and loads[1][1] > 0
        run.join()
    finally:
        staging[0] = False
        warmer.stop()
        qtbot.waitUntil(lambda: not _stages.pending(), timeout=5_000)


@pytest.mark.gui
def test_a_piece_waits_while_a_series_opens_and_a_while_after(qtbot, monkeypatch):
    """Work the cockpit says the user waits for (its Data tab opening a series: ``defer_while``) holds a piece's
    loading back like staged GUI work, and the loading starts only once the window has been free of it for
    LOAD_IDLE_S (a load begun as one sample finished opening ran into the next one's layers)."""
    import time

    monkeypatch.setattr(_warmup, "LOAD_IDLE_S", 0.5)
    loads: list[float] = []
    monkeypatch.setattr(_warmup, "_warm_kernels", lambda piece: loads.append(time.monotonic()))
    opening = [True]
    warmer = KernelWarmer(("-c", "print('reconstruct', flush=True); import time; time.sleep(60)"))
    warmer.defer_while(lambda: opening[0])
    try:
        qtbot.waitUntil(lambda: "reconstruct" in warmer._asked, timeout=10_000)
        qtbot.wait(3 * _warmup.LOAD_RETRY_MS)
        assert not loads and not warmer.loaded("reconstruct")
        opening[0] = False
        free = time.monotonic()
        qtbot.waitUntil(lambda: warmer.loaded("reconstruct"), timeout=5_000)
        assert len(loads) == 1 and loads[0] - free >= _warmup.LOAD_IDLE_S - _warmup.LOAD_RETRY_MS / 1000
    finally:
        warmer.stop()


@pytest.mark.gui
def test_a_piece_a_run_waits_for_is_loaded_while_a_series_opens(qtbot, monkeypatch):
    import threading

    loads: list[str] = []
    monkeypatch.setattr(_warmup, "_warm_kernels", loads.append)
    warmer = KernelWarmer(("-c", "print('reconstruct', flush=True); import time; time.sleep(60)"))
    warmer.defer_while(lambda: True)
    try:
        qtbot.waitUntil(lambda: "reconstruct" in warmer._asked, timeout=10_000)
        run = threading.Thread(target=warmer.wait, args=("reconstruct", 10.0))
        run.start()
        qtbot.waitUntil(lambda: warmer.loaded("reconstruct"), timeout=5_000)
        run.join()
        assert loads == ["reconstruct"]
    finally:
        warmer.stop()


@pytest.mark.gui
@pytest.mark.usefixtures("cache_home")
def test_the_cockpit_holds_the_kernels_back_while_its_data_tab_opens_a_series(make_napari_viewer, qtbot):
    _, cockpit = make_napari_viewer().window.add_plugin_dock_widget("napari-cspt2d", "Cockpit")
    try:
        assert cockpit._loading in cockpit.warmer._deferrals and not cockpit._loading()
        data = cockpit.data
        data._worker = object()  # (what a load in progress holds)
        assert cockpit._loading()
        data._worker = None
    finally:
        cockpit.close_session()
    assert cockpit._loading not in cockpit.warmer._deferrals
