"""OME-Zarr in and out: blockwise predictions written as NGFF pyramids (local and s3://), TIFF with ImageJ scale."""

import numpy as np
import zarr

from tests.system.harness import Cluster
from tests.system.test_blockwise import BLOCK_VOXELS

SCALE = [0.5, 0.1, 0.1]  # z, y, x in micrometres: anisotropic, so only y and x halve per level


def _ome_input(url, storage_options=None, shape=(6, 128, 128)):
    """An OME-Zarr image written by ome-zarr itself (one level), chunks of one 64x64 tile per slice."""
    from ome_zarr.writer import write_image

    rng = np.random.default_rng(3)
    a = (rng.random(shape) * 80).astype(np.uint8)
    a[:, 20:70, 30:90] += 120
    group = zarr.open_group(url, mode="w", storage_options=storage_options, zarr_format=3)
    write_image(a, group, axes="zyx", scale_factors=[], scale=dict(zip("zyx", SCALE)),
                axes_units={n: "micrometer" for n in "zyx"}, storage_options={"chunks": (1, 64, 64)})
    return a


def _read_back(url):
    """(image node, labels node) as ome-zarr's reader sees ``url``."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    nodes = list(Reader(parse_url(url))())
    image = next(n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs)
                 and not any(isinstance(s, Label) for s in n.specs))
    labels = next(n for n in nodes if any(isinstance(s, Label) for s in n.specs))
    return image, labels


def _check_pyramid(url, source):
    image, labels = _read_back(url)
    assert [tuple(d.shape) for d in labels.data] == [(6, 128, 128), (6, 64, 64), (6, 32, 32)]
    assert [tuple(d.shape) for d in image.data] == [(6, 128, 128), (6, 64, 64), (6, 32, 32)]
    for node in (image, labels):
        assert [a["name"] for a in node.metadata["axes"]] == ["z", "y", "x"]
        assert {a.get("unit") for a in node.metadata["axes"]} == {"micrometer"}
        scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
        assert scales == [[0.5, 0.1, 0.1], [0.5, 0.2, 0.2], [0.5, 0.4, 0.4]]
    seg = [np.asarray(d) for d in labels.data]
    assert set(np.unique(seg[0])) <= {1, 2} and len(np.unique(seg[0])) == 2
    np.testing.assert_array_equal(seg[1], seg[0][:, ::2, ::2])  # labels: nearest neighbour, level from level
    np.testing.assert_array_equal(seg[2], seg[1][:, ::2, ::2])
    img = [np.asarray(d) for d in image.data]
    np.testing.assert_array_equal(img[0], source)  # the input, copied block by block
    mean = source.astype(np.float32).reshape(6, 64, 2, 64, 2).mean(axis=(2, 4))
    np.testing.assert_array_equal(img[1], np.rint(mean).astype(np.uint8))  # images: the mean
    return seg[0]


def test_an_ome_zarr_volume_is_predicted_blockwise_into_a_pyramid_with_labels_under_the_image(home, tmp_path, model):
    source = _ome_input(str(tmp_path / "in.ome.zarr"))
    with Cluster(tmp_path, home) as c:
        c.agent("a1")
        c.agent("a2")
        c.cli("predict", str(model), str(tmp_path / "in.ome.zarr"), "-o", str(tmp_path / "out.ome.zarr"),
              "--block-voxels", BLOCK_VOXELS)
        seg = _check_pyramid(str(tmp_path / "out.ome.zarr"), source)
        # the same volume as a plain zarr array: the same labels at full resolution
        plain = zarr.create_array(str(tmp_path / "in.zarr"), shape=source.shape, chunks=(1, 64, 64), dtype="uint8")
        plain[...] = source
        c.cli("predict", str(model), str(tmp_path / "in.zarr"), "-o", str(tmp_path / "plain.zarr"),
              "--block-voxels", BLOCK_VOXELS)
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "plain.zarr"), mode="r")[...], seg)
        # an OME-Zarr input into a TIFF: ImageJ axes and the input's voxel size, which Fiji reads
        c.cli("predict", str(model), str(tmp_path / "in.ome.zarr"), "-o", str(tmp_path / "seg.tif"))
    import tifffile

    with tifffile.TiffFile(tmp_path / "seg.tif") as tf:
        assert tf.is_imagej and tf.series[0].axes == "ZYX"
        assert tf.imagej_metadata["spacing"] == 0.5 and tf.imagej_metadata["unit"] == "um"
        xr = tf.pages[0].tags["XResolution"].value
        assert abs(xr[0] / xr[1] - 10.0) < 1e-3  # 10 pixels per micrometre
        np.testing.assert_array_equal(tf.asarray(), seg)


def test_an_ome_zarr_on_s3_is_predicted_into_an_ome_zarr_on_s3(home, tmp_path, model, s3):
    from dlorch.core.volumes import storage_options

    source = _ome_input("s3://bucket/in.ome.zarr", storage_options("s3://bucket/in.ome.zarr"))
    with Cluster(tmp_path, home, DLORCH_ALLOW_URLS="s3://bucket/", **s3) as c:
        c.agent("a1")
        c.cli("predict", str(model), "s3://bucket/in.ome.zarr", "-o", "s3://bucket/out.ome.zarr",
              "--block-voxels", BLOCK_VOXELS)
        _check_pyramid("s3://bucket/out.ome.zarr", source)
        # the same output again: a previous dlorch output is replaced, anything else is refused
        again = c.cli("predict", str(model), "s3://bucket/in.ome.zarr", "-o", "s3://bucket/in.ome.zarr",
                      check=False)
        assert again.returncode != 0 and "is the input" in again.stderr and "Traceback" not in again.stderr
