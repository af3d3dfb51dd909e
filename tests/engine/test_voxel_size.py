"""A file's physical voxel size (OME-Zarr scale, ImageJ TIFF) decides 2D or 3D; without one the data are measured."""

import numpy as np
import pytest

from dlorch.core import omezarr
from dlorch.core.engine.anisotropy import declared_anisotropy, stack_anisotropy
from dlorch.core.imageio import read_grid, write_image


def _isotropic(shape=(20, 48, 48), scale=2.0, seed=0) -> np.ndarray:
    """A random texture as alike along Z as in-plane: measured, it is a volume for 3D."""
    noise = np.random.default_rng(seed).normal(size=shape)
    freqs = np.meshgrid(*(np.fft.fftfreq(n) for n in shape), indexing="ij")
    gain = np.exp(-2 * (np.pi * scale) ** 2 * sum(f**2 for f in freqs))
    return np.fft.ifftn(np.fft.fftn(noise) * gain).real.astype(np.float32)


def test_a_declared_voxel_size_is_the_anisotropy_and_one_by_one_by_one_declares_none():
    assert declared_anisotropy((4.0, 1.0, 1.0)) == 4.0
    assert declared_anisotropy((0.5, 0.25, 0.25)) == pytest.approx(2.0)
    assert declared_anisotropy((1.0, 1.0, 1.0)) is None  # what a file without a size reads as
    assert declared_anisotropy((0.0, 1.0, 1.0)) is None and declared_anisotropy((1.0, 1.0)) is None
    vol = _isotropic()
    aniso, why = stack_anisotropy(vol, (4.0, 1.0, 1.0))
    assert aniso == 4.0 and "voxel size 4 x 1 x 1" in why
    measured, why = stack_anisotropy(vol)
    assert measured < 1.5 and "measured" in why


def test_voxel_sizes_of_an_ome_zarr_and_an_imagej_tiff_read_back_as_their_anisotropy(tmp_path):
    vol = _isotropic()
    grid = omezarr.Grid(("z", "y", "x"), (2.0, 0.5, 0.5), "micrometer")
    omezarr.write_array(vol, str(tmp_path / "vol.ome.zarr"), grid)
    write_image(vol, tmp_path / "vol.tif", grid=grid)
    for name in ("vol.ome.zarr", "vol.tif"):
        scale = read_grid(tmp_path / name).scale
        assert scale == pytest.approx((2.0, 0.5, 0.5)), name
        assert declared_anisotropy(scale) == pytest.approx(4.0), name
    write_image(vol, tmp_path / "plain.tif")  # no size: ImageJ's 1 x 1 x 1, measured instead
    plain = read_grid(tmp_path / "plain.tif")
    assert plain is None or declared_anisotropy(plain.scale) is None


def test_the_voxel_size_turns_a_volume_measured_isotropic_into_slices_for_both_tasks():
    from dlorch.core.engine.denoise import plan_denoising
    from dlorch.core.engine.segment import plan_segmentation

    vol = _isotropic()
    labels = np.zeros(vol.shape, np.uint8)
    labels[:, 5:9, 5:40] = 1
    labels[:, 30:34, 5:40] = 2
    sections = plan_segmentation(vol, labels, epochs=1, voxel_size=(5.0, 1.0, 1.0))
    assert sections.spatial_dims == 2
    assert any("anisotropy 5.00 from the image's voxel size" in r for r in sections.reasons), sections.reasons
    assert any("slice by slice" in r and "5.0" in r for r in sections.reasons)
    denoise = plan_denoising(vol, epochs=1, voxel_size=(5.0, 1.0, 1.0))
    assert denoise.spatial_dims == 2 and any("from the image's voxel size" in r for r in denoise.reasons)
