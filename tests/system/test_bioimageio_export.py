"""`dlorch export`: a trained model as a bioimage.io package that bioimageio.core validates and reproduces;
the package back in as a `predict` model (its state-dict weights in dlorch's network; other architectures refused)."""

import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import synthetic_pair
from tests.system.harness import cli_env, dlorch


@pytest.fixture(scope="module")
def denoiser(tmp_path_factory):
    """A small Noise2Void checkpoint and its noisy image, made in-process once for the module."""
    from dlorch.core.engine.denoise import plan_denoising, train_denoising
    from dlorch.core.engine.hooks import NoHooks

    tmp = tmp_path_factory.mktemp("denoiser")
    noisy = np.load(synthetic_pair(tmp)[0]).astype(np.float32)
    np.save(tmp / "noisy.npy", noisy)
    plan = plan_denoising(noisy, epochs=1)
    result = train_denoising(noisy, None, plan, workdir=tmp / "w", resume_from=None, hooks=NoHooks())
    return result.checkpoint, tmp / "noisy.npy"


@pytest.fixture(scope="module")
def package(tmp_path_factory, model):
    """The module's segmentation model exported once (in-process), with the image of its test tensors."""
    from dlorch.orchestrator.export import export_model

    tmp = tmp_path_factory.mktemp("package")
    image, _ = synthetic_pair(tmp)
    return export_model(Path(model), np.load(image), tmp / "model.zip"), image


def _formats(summary) -> set[str]:
    """The weight formats whose test outputs bioimageio.core reproduced."""
    return {d.name.rsplit("(", 1)[-1].rstrip(")") for d in summary.details
            if d.name.startswith("Reproduce test outputs") and d.status == "passed"}


def test_a_segmentation_model_exports_to_a_package_bioimageio_core_validates_and_reproduces(home, tmp_path, model):
    from bioimageio.core import test_model
    from bioimageio.spec import load_model_description

    image, _ = synthetic_pair(tmp_path)
    out = tmp_path / "model.zip"
    dlorch("export", str(model), "-o", str(out), "--image", str(image), env=cli_env())
    names = set(zipfile.ZipFile(out).namelist())
    assert {"rdf.yaml", "weights.pt", "test_input.npy", "test_output.npy", "cover.png", "README.md"} <= names
    descr = load_model_description(out)
    assert descr.weights.torchscript is not None and len(descr.cite) >= 1
    assert [str(a.id) for a in descr.inputs[0].axes] == ["batch", "channel", "y", "x"]
    summary = test_model(out)  # format, and the package's own test outputs from its test inputs
    assert summary.status == "passed", summary.format()
    assert _formats(summary) == {"torchscript", "pytorch_state_dict"}, summary.format()
    # the test output is dlorch's own prediction on the tile: probabilities of the classes, summing to 1
    with zipfile.ZipFile(out) as z, z.open("test_output.npy") as f:
        probs = np.load(f)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_a_denoising_model_exports_to_a_package_whose_test_outputs_bioimageio_core_reproduces(tmp_path, denoiser):
    from bioimageio.core import test_model
    from bioimageio.spec import load_model_description

    from dlorch.orchestrator.export import export_model

    checkpoint, noisy = denoiser
    out = export_model(checkpoint, np.load(noisy), tmp_path / "denoiser.zip")
    descr = load_model_description(out)
    assert [str(t.id) for t in descr.outputs] == ["denoised"] and "denoising" in descr.tags
    summary = test_model(out)
    assert summary.status == "passed", summary.format()
    assert _formats(summary) == {"torchscript", "pytorch_state_dict"}, summary.format()
    with zipfile.ZipFile(out) as z, z.open("test_input.npy") as fi, z.open("test_output.npy") as fo:
        x, y = np.load(fi), np.load(fo)
    # in the image's units, not the network's: a denoised tile keeps the noisy tile's level
    assert abs(float(y.mean()) - float(x.mean())) < 0.5 * float(x.std())


def test_an_exported_denoiser_predicts_through_dlorch_as_its_checkpoint_does(tmp_path, denoiser):
    from dlorch.core.engine.denoise import predict_denoising
    from dlorch.orchestrator.export import export_model
    from dlorch.orchestrator.zooimport import checkpoint_from_package

    checkpoint, noisy = denoiser
    package = export_model(checkpoint, np.load(noisy), tmp_path / "denoiser.zip")
    task, imported = checkpoint_from_package(package, tmp_path / "imported.ckpt")
    image = np.load(noisy)
    assert task == "denoising"
    np.testing.assert_array_equal(predict_denoising(imported, image), predict_denoising(checkpoint, image))


@pytest.mark.slow  # a prediction through the CLI, its embedded orchestrator and agent
def test_dlorch_predicts_with_a_package_it_exported_as_with_the_checkpoint(home, tmp_path, model, package):
    from dlorch.core.engine.segment import predict_segmentation

    package, image = package
    dlorch("predict", str(package), str(image), "-o", str(tmp_path / "seg.npy"), env=cli_env())
    np.testing.assert_array_equal(np.load(tmp_path / "seg.npy"), predict_segmentation(Path(model), np.load(image)))


def _rewritten(package: Path, out: Path, change) -> Path:
    """A copy of ``package`` whose rdf.yaml ``change`` edited (a package of another make)."""
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "rdf.yaml":
                rdf = yaml.safe_load(data)
                change(rdf)
                data = yaml.safe_dump(rdf).encode()
            dst.writestr(name, data)
    return out


@pytest.mark.slow  # the refusal through the CLI (a process that imports torch)
def test_predict_refuses_a_package_of_another_architecture_in_one_line(home, tmp_path, package):
    from dlorch.core.errors import BadInput
    from dlorch.orchestrator.zooimport import checkpoint_from_package

    package, image = package

    def torchscript_only(rdf):
        del rdf["weights"]["pytorch_state_dict"]
        rdf["weights"]["torchscript"].pop("parent", None)

    def other_library(rdf):
        rdf["weights"]["pytorch_state_dict"]["architecture"]["import_from"] = "os"

    refusal = ("{} is a bioimage.io model of another architecture ({}); dlorch predicts with packages `dlorch export` "
               "wrote and never runs a package's own code: run this one in bioimageio.core, deepImageJ or ilastik")
    other = _rewritten(package, tmp_path / "torchscript_only.zip", torchscript_only)
    cp = dlorch("predict", str(other), str(image), "-o", str(tmp_path / "seg.npy"), env=cli_env(), check=False)
    assert cp.returncode != 0 and cp.stderr.strip().splitlines() == [
        "error: " + refusal.format(other, "weights torchscript and no pytorch_state_dict of dlorch's network")], cp.stderr
    assert not (tmp_path / "seg.npy").exists()
    other = _rewritten(package, tmp_path / "other_library.zip", other_library)
    with pytest.raises(BadInput) as e:
        checkpoint_from_package(other, tmp_path / "never.ckpt")
    assert str(e.value) == refusal.format(other, "architecture os:dlorch_unet, not dlorch's")
    assert not (tmp_path / "never.ckpt").exists()


def test_export_refuses_a_name_that_is_not_a_zip_in_one_line(home, tmp_path, model):
    cp = dlorch("export", str(model), "-o", str(tmp_path / "model.yaml"), env=cli_env(), check=False)
    assert cp.returncode != 0 and cp.stderr.strip().splitlines() == [
        f"error: -o {tmp_path / 'model.yaml'}: a bioimage.io package is a .zip; give a name ending in .zip"]


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
