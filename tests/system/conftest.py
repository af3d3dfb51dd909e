"""Fixtures of the system tests: a real redis-server, moto's S3 server, an isolated dlorch home, a trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import free_port, synthetic_pair
from tests.system.harness import RedisServer


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.kill()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An isolated embedded-default state directory, also exported for subprocesses."""
    h = tmp_path / "dlorch-home"
    monkeypatch.setenv("DLORCH_HOME", str(h))
    for var in ("DLORCH_STORE", "DLORCH_QUEUE", "DLORCH_SECRET"):
        monkeypatch.delenv(var, raising=False)
    return h


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A small trained checkpoint, made in-process once for the module."""
    from dlorch.core.engine.hooks import NoHooks
    from dlorch.core.engine.segment import plan_segmentation, train_segmentation

    tmp = tmp_path_factory.mktemp("model")
    img, lab = synthetic_pair(tmp)
    image, labels = np.load(img), np.load(lab)
    plan = plan_segmentation(image, labels, epochs=1)
    return train_segmentation(image, labels, plan, workdir=tmp / "w", resume_from=None, hooks=NoHooks()).checkpoint


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server over HTTP with a bucket named "bucket"; the AWS variables point at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import urllib.request

    import boto3

    # moto keeps its state per process, not per server: start every test from an empty S3
    urllib.request.urlopen(urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST"))
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bucket")
    yield env
    server.stop()


@pytest.fixture
def ec2(s3, monkeypatch):
    """The same moto server for EC2 as well: an AMI and a launch template "dlorch-node" launching it.

    moto's ~1300 default AMIs take seconds to load and list, so it loads none; the one AMI is registered.
    """
    import boto3

    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")  # read when the region's EC2 state is made
    client = boto3.client("ec2", endpoint_url=s3["AWS_ENDPOINT_URL"], region_name="us-east-1")
    client.register_image(Name="dlorch-node-image")
    ami = client.describe_images(Owners=["self"])["Images"][0]["ImageId"]
    client.create_launch_template(LaunchTemplateName="dlorch-node",
                                  LaunchTemplateData={"ImageId": ami, "InstanceType": "t3.micro"})
    return {**s3, "region": "us-east-1", "launch_template": "dlorch-node", "ami": ami}
