"""Writes tests/data/pyp_metadata_pandas2.pkl.b64: a ``{name}.pkl`` built the way pyp's ``LocalMetadata`` builds it
(``pyp/inout/metadata/pyp_metadata.py``: ``loadImageDim`` -> ``image``/``tomo`` x, y, z; ``loadTextFile`` ->
``tlt``/``order``/``ali``/``ctf`` with pyp's column names; ``loadTextStr`` -> ``frames``; ``write`` -> plain
``pickle.dump``), under the pandas and numpy that pyp pins (``requirements.txt``: pandas==2.3.3, numpy==1.26.4).

Run with such an interpreter: ``python make_pyp_metadata.py | base64 -w 100 > pyp_metadata_pandas2.pkl.b64``.
"""

import pickle
import sys

import numpy as np
import pandas as pd

data = {"mode": "tomo"}
data["image"] = pd.DataFrame(np.array([3708, 3838, 3]).reshape(1, 3), columns=["x", "y", "z"])
data["tomo"] = pd.DataFrame(np.array([463, 479, 256]).reshape(1, 3), columns=["x", "y", "z"])
data["order"] = pd.DataFrame(np.array([[1.0], [0.0], [2.0]]), index=None, columns=["order"])
data["tlt"] = pd.DataFrame(np.array([[-3.0], [0.0], [3.0]]), index=None, columns=["tilt_angle"])
c, s = np.cos(np.radians(-85.3)), np.sin(np.radians(-85.3))  # raw -> aligned turns the axis (85.3 deg) to y
data["ali"] = pd.DataFrame(np.tile([c, -s, s, c, 2.5, -1.5], (3, 1)), columns=["m00", "m01", "m02", "m03", "dx", "dy"])
data["ctf"] = pd.DataFrame(np.array([[-3.0, 25000, 24000, 40, 0.1, 5], [0, 25100, 24100, 41, 0.1, 5],
                                     [3, 25200, 24200, 42, 0.1, 5]]),
                           columns=["tilt_angle", "df1", "df2", "ast", "cc", "est_res"])
data["frames"] = ["TS_01_000_0.0.tif", "TS_01_001_3.0.tif", "TS_01_002_-3.0.tif"]
data["drift"] = {0: pd.DataFrame(np.zeros((2, 6)), columns=["m00", "m01", "m02", "m03", "dx", "dy"])}
sys.stdout.buffer.write(pickle.dumps(data))
