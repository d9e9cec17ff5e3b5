"""nextPYP's module names for the seed's scripts, served by napari-cspt2d: opt in by putting :data:`PATH` first on
``sys.path``.

The seed's scripts import pyp's modules (``from pyp_main import csp_split``,
``from pyp.refine.csp.particle_cspt import ...``, ``from pyp.system import project_params``,
``from pyp.inout.metadata.frealign_parfile import Parameters``, ``from pyp.inout.image import mrc``). This folder
holds modules of those names that re-export :mod:`napari_cspt2d.pyp`, so the scripts run unchanged::

    export PYTHONPATH="$(python -m napari_cspt2d.pyp_names)${PYTHONPATH:+:$PYTHONPATH}"
    python seed_script.py

It is not on ``sys.path`` by default, because these modules are not nextPYP: installing them as top-level ``pyp``
would hide a real pyp installation. Only the names the seed uses exist; ``pyp.__file__`` shows whose they are.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PATH"]

#: The folder to put on ``sys.path`` (``PYTHONPATH``) for ``import pyp_main`` and ``import pyp...``.
PATH = Path(__file__).resolve().parent
