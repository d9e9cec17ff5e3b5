"""The seed's scripts (``../shared/seed``), verbatim, as users run them: ``python script.py`` (no ``__main__`` guard),
``python -c`` and a Jupyter kernel, each in a fresh process in a project folder, with two local dask workers and
pyp's module names served by :mod:`napari_cspt2d.pyp_names`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_cspt2d import pyp
from napari_cspt2d.io.mrc import write_stack
from napari_cspt2d.pyp_names import PATH as PYP_NAMES
from napari_cspt2d.sample import make_sample, write_sample

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "000_1c13ebc37b1c5bec.txt"
#: Small runs: two local workers, one refinement iteration (the seed's ``iteration=2`` up to ``refine_maxiter``).
SETTINGS = {"refine_maxiter": 2, "slurm_bundle_size": 2, "workers": 2, "cluster_backend": "local",
            "refine_rhref": "20:16"}
#: The seed's snippets use ``parameters`` without defining it; its complete script defines it like this.
LOAD_PARAMETERS = "from pyp.system import project_params\nparameters = project_params.load_pyp_parameters()\n"
FORMS = ("script", "python -c", "jupyter")
_TIMEOUT_S = 280


def seed_block(heading: str) -> str:
    """The first ```python block after ``heading`` in the seed document, verbatim."""
    if not SEED.is_file():
        pytest.skip(f"the seed document is not at {SEED} (the ../shared folder beside the repository)")
    text = SEED.read_text(encoding="utf-8")
    start = text.index(heading)
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match is not None, heading
    return match.group(1)


@pytest.fixture
def seed_env(child_env) -> dict[str, str]:
    """A subprocess environment with pyp's names first on the path (as the README says to set it)."""
    return {**child_env, "PYTHONPATH": os.pathsep.join((str(PYP_NAMES), child_env["PYTHONPATH"]))}


def run_as_script(code: str, cwd: Path, env: dict[str, str]) -> tuple[bool, str]:
    script = cwd / "seed_script.py"
    script.write_text(code, encoding="utf-8")
    result = subprocess.run([sys.executable, script.name], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=_TIMEOUT_S)
    return result.returncode == 0, result.stdout + result.stderr


def run_with_c(code: str, cwd: Path, env: dict[str, str]) -> tuple[bool, str]:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=_TIMEOUT_S)
    return result.returncode == 0, result.stdout + result.stderr


def run_in_kernel(code: str, cwd: Path, env: dict[str, str]) -> tuple[bool, str]:
    """``code`` as one cell of a fresh IPython kernel (this interpreter) started in ``cwd``."""
    manager = pytest.importorskip("jupyter_client.manager", reason="jupyter_client is not installed")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed")
    km = manager.KernelManager(kernel_name="python3")
    km.kernel_cmd = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    km.start_kernel(cwd=str(cwd), env=env)
    output: list[str] = []

    def collect(msg: dict) -> None:
        content = msg["content"]
        if msg["msg_type"] == "stream":
            output.append(content["text"])
        elif msg["msg_type"] == "error":
            output.append("\n".join(content["traceback"]))

    try:
        client = km.client()
        client.start_channels()
        client.wait_for_ready(timeout=60)
        reply = client.execute_interactive(code, timeout=_TIMEOUT_S, output_hook=collect)
        client.stop_channels()
    finally:
        km.shutdown_kernel(now=True)
    return reply["content"]["status"] == "ok", "".join(output)


RUNNERS = {"script": run_as_script, "python -c": run_with_c, "jupyter": run_in_kernel}


def run_seed(form: str, code: str, cwd: Path, env: dict[str, str]) -> str:
    ok, output = RUNNERS[form](code, cwd, env)
    assert ok, output[-4000:]
    assert "bootstrapping phase" not in output, output[-4000:]
    return output


#: A script whose top level leaves a mark per process that runs it, then starts two local workers.
MARKING_SCRIPT = """
import os
from pathlib import Path
Path(f"ran-in-{os.getpid()}").touch()
if __name__ == "__main__":
    from napari_cspt2d.cluster import make_client
    with make_client({"cluster_backend": "local", "workers": 2}) as client:
        pids = set(client.gather(client.map(lambda _: os.getpid(), range(8), pure=False)))
    print(sorted(pids))
"""


def test_local_workers_never_run_the_users_main_script(tmp_path, seed_env):
    output = run_seed("script", MARKING_SCRIPT, tmp_path, seed_env)
    worker_pids = {int(p) for p in re.findall(r"\d+", output.strip().splitlines()[-1])}
    marks = sorted(p.name for p in tmp_path.glob("ran-in-*"))
    assert worker_pids and len(marks) == 1, (marks, worker_pids)
    assert int(marks[0].rsplit("-", 1)[1]) not in worker_pids


@pytest.fixture(scope="module")
def ts001_template(tmp_path_factory):
    """The seed's tilt series ``ts001`` as a pyp project (4 particles × 11 tilts, 160², box 32)."""
    root = tmp_path_factory.mktemp("ts001")
    sample = make_sample(n_particles=4, n_tilts=11, shape_yx=(160, 160), box=32, thickness_px=30.0)
    write_sample(sample, root, name="ts001")
    params = pyp.load_parameters(root)
    params.update(SETTINGS)
    pyp.save_parameters(params, root)
    return root


@pytest.fixture
def ts001(tmp_path, ts001_template):
    return Path(shutil.copytree(ts001_template, tmp_path / "ts001"))


@pytest.mark.parametrize("form", FORMS)
def test_option_a_runs_verbatim(form, ts001, seed_env):
    """Option A at the top level of a script without a ``__main__`` guard: the local workers must not import it."""
    run_seed(form, LOAD_PARAMETERS + seed_block("#### Option A"), ts001, seed_env)
    maps = ts001 / "frealign" / "maps"
    assert (maps / "ts001_r01_02.mrc").is_file() and (maps / "ts001_r01_02.cistem").is_file()
    refined = pyp.Parameters.from_file(maps / "ts001_r01_02.cistem").data
    assert refined.shape[0] == pyp.Parameters.from_file(maps / "ts001_r01.cistem").data.shape[0]


@pytest.mark.parametrize("form", FORMS)
def test_option_b_runs_verbatim(form, ts001, seed_env):
    output = run_seed(form, LOAD_PARAMETERS + seed_block("#### Option B"), ts001, seed_env)
    assert (ts001 / "frealign" / "maps" / "ts001_r01_02.mrc").is_file(), output
    assert len(list((ts001 / "frealign" / "scratch").glob("ts001_r01_region*.cistem"))) >= 4


@pytest.fixture(scope="module")
def complete_template(tmp_path_factory):
    """What the seed's complete script expects to find: ``.pyp_config.toml`` and ``ts001_stack.mrc`` (13 tilts of
    1024², as its metadata says); the script writes the ``.cistem`` pair and ``ts001.pkl`` itself."""
    root = tmp_path_factory.mktemp("complete")
    rng = np.random.default_rng(1)
    write_stack(root / "ts001_stack.mrc", rng.normal(size=(13, 1024, 1024)).astype(np.float32), 1.35)
    config = dict(SETTINGS, data_set="ts001", extract_box=32, extract_bin=1, scope_pixel=1.35, particle_rad=18.0,
                  refine_rhref="8:6", csp_no_3d_points=True, csp_frame_refinement=True, data_mode="tomo")
    pyp.save_parameters(config, root)
    return root


@pytest.fixture
def complete(tmp_path, complete_template):
    return Path(shutil.copytree(complete_template, tmp_path / "complete"))


@pytest.mark.parametrize("form", FORMS)
def test_example_complete_script_runs_verbatim(form, complete, seed_env):
    run_seed(form, seed_block("## Example Complete Script"), complete, seed_env)
    maps = complete / "frealign" / "maps"
    written = pyp.Parameters.from_file(maps / "ts001_r01.cistem").data
    assert written.shape == (10 * 13, 7)  # the script's 10 particles x 13 tilts
    assert (maps / "ts001_r01_02.mrc").is_file() and (maps / "ts001_r01_02.cistem").is_file()
