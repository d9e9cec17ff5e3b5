"""Shared fixtures: the real data in ../shared/data and a small synthetic sample."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (real files with PROVENANCE.md); skip when it is absent."""
    if not (SHARED_DATA / "PROVENANCE.md").is_file():
        pytest.skip(f"real test data not found at {SHARED_DATA} (the ../shared folder beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_sample():
    """A small synthetic tilt series (12 particles × 21 tilts, 384², box 48) with ground truth."""
    from napari_cspt2d.sample import make_sample

    return make_sample(n_particles=12, n_tilts=21, shape_yx=(384, 384), box=48, thickness_px=60.0)


#: The small synthetic tilt series the widget tests load (fast to make and to reconstruct).
GUI_SAMPLE = {"n_particles": 8, "n_tilts": 15, "shape_yx": (256, 256), "box": 32}


@pytest.fixture(scope="module")
def sample_layers():
    """napari layer data of :data:`GUI_SAMPLE` (image, tracks, trajectories), as File > Open Sample makes it."""
    from napari_cspt2d._sample_data import make_sample_data

    return make_sample_data(**GUI_SAMPLE)


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """A private ``XDG_CACHE_HOME`` (autosaves of tracks without a file go there)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def refined(tmp_path_factory):
    """:data:`GUI_SAMPLE` refined headless (one CSPT iteration) by the cockpit's job, in a pyp project:
    ``(sample, params, item, root)`` with ``item`` the refinement's :class:`~napari_cspt2d.runs.IterationResult`."""
    from napari_cspt2d import pyp
    from napari_cspt2d.model.editing import TrackDocument
    from napari_cspt2d.model.params import PypParameters
    from napari_cspt2d.runs import Session, run_job
    from napari_cspt2d.sample import make_sample

    sample = make_sample(**GUI_SAMPLE)
    root = tmp_path_factory.mktemp("project")
    params = PypParameters(sample.params)
    pyp.create_project(root, "sample", sample.stack, sample.tracks, params, angles=sample.tracks.tilts)
    session = Session(sample.stack, None, sample.tracks.tilts, TrackDocument(sample.tracks), sample.tracks, params,
                      root, "sample")
    items = list(run_job(session, "refine", lambda *a: None, lambda: False))
    assert [i.iteration for i in items] == [1, 2]
    return sample, params, items[-1], root


@pytest.fixture
def child_env() -> dict[str, str]:
    """This process's environment for a subprocess (a user's script, the ``cspt2d`` command) that must import the
    same napari_cspt2d as the tests: its source folder first on ``PYTHONPATH``, as an absolute path."""
    import napari_cspt2d

    env = dict(os.environ)
    source = str(Path(napari_cspt2d.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH", "")) if p)
    return env


@pytest.fixture
def staged_turns(monkeypatch) -> list[int]:
    """A one-item list counting the staged GUI turns run so far (``_qt._stages``: each step in a turn of its own)."""
    from napari_cspt2d._qt import _stages

    turns = [0]
    run_next = _stages._run_next

    def counted() -> None:
        turns[0] += 1
        run_next()

    monkeypatch.setattr(_stages, "_run_next", counted)
    return turns
