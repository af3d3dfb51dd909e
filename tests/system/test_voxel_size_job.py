"""The voxel size of an input file reaches the plan a real agent makes: ImageJ TIFF sections train in 2D."""

import numpy as np
import pytest

from dlorch.core import omezarr
from dlorch.core.imageio import write_image
from tests.engine.test_voxel_size import _isotropic
from tests.system.harness import Cluster


@pytest.mark.slow  # a training job through a real agent
def test_a_tiff_whose_voxel_size_says_sections_is_planned_slice_by_slice_by_the_agent(home, tmp_path):
    vol = (_isotropic() * 40 + 120).clip(0, 255).astype(np.uint8)  # measured, a volume for 3D
    labels = np.zeros(vol.shape, np.uint8)
    labels[:, 5:9, 5:40] = 1
    labels[:, 30:34, 5:40] = 2
    grid = omezarr.Grid(("z", "y", "x"), (2.5, 0.5, 0.5), "micrometer")  # 5 in-plane pixels a slice step
    write_image(vol, tmp_path / "sections.tif", grid=grid)
    np.save(tmp_path / "strokes.npy", labels)
    with Cluster(tmp_path, home) as c:
        c.agent("a1")
        job = c.submit("train", "segment", str(tmp_path / "sections.tif"), "--labels", str(tmp_path / "strokes.npy"),
                       "--epochs", "1")
        plan = c.wait_job(job, lambda j: j.get("plan"), timeout=600, what="the job's plan")["plan"]
    assert plan["spatial_dims"] == 2, plan["reasons"]
    assert any("anisotropy 5.00 from the image's voxel size 2.5 x 0.5 x 0.5" in r for r in plan["reasons"]), \
        plan["reasons"]
