"""The providers' pure parts: how EC2 and Slurm refusals map to what the policy can act on, the Slurm command
lines and squeue parsing, and the fault rules (faults a real service produces only at its own whim)."""

from __future__ import annotations

import pytest

from dlorch.core.errors import BadInput
from dlorch.orchestrator.fleet import ec2, slurm
from dlorch.orchestrator.fleet.faults import Fault
from dlorch.orchestrator.fleet.model import (
    CapacityError,
    InstanceState,
    LaunchRequest,
    Market,
    ProviderError,
    QuotaError,
    ThrottledError,
)


def _client_error(code: str, message: str = "no"):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message}}, "RunInstances")


@pytest.mark.parametrize("code, kind", [
    ("InsufficientInstanceCapacity", CapacityError), ("SpotMaxPriceTooLow", CapacityError),
    ("InsufficientCapacity", CapacityError), ("Unsupported", CapacityError),
    ("VcpuLimitExceeded", QuotaError), ("InstanceLimitExceeded", QuotaError),
    ("MaxSpotInstanceCountExceeded", QuotaError),
    ("RequestLimitExceeded", ThrottledError), ("Throttling", ThrottledError),
    ("InvalidLaunchTemplateName.NotFoundException", BadInput), ("UnauthorizedOperation", BadInput),
    ("InternalError", ProviderError),
])
def test_ec2_errors_map_to_what_the_policy_can_do(code, kind):
    mapped = ec2.classify(_client_error(code, "We currently do not have sufficient\n capacity"), "launch of g5.xlarge")
    assert type(mapped) is kind
    assert code in str(mapped) and "\n" not in str(mapped)


def test_ec2_missing_credentials_is_one_line_naming_the_fix():
    from botocore.exceptions import NoCredentialsError

    mapped = ec2.classify(NoCredentialsError(), "list of instances")
    assert isinstance(mapped, BadInput) and "AWS_ACCESS_KEY_ID" in str(mapped)


def test_ec2_client_token_fits_the_api():
    assert ec2.client_token("n-1") == "n-1"
    long = "n" * 128
    assert len(ec2.client_token(long)) == 64 and ec2.client_token(long) == ec2.client_token(long)


@pytest.mark.parametrize("stderr, kind", [
    ("sbatch: error: Batch job submission failed: Requested node configuration is not available", CapacityError),
    ("sbatch: error: QOSMaxSubmitJobPerUserLimit", QuotaError),
    ("sbatch: error: Batch job submission failed: Job violates accounting/QOS policy", QuotaError),
    ("sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying", ThrottledError),
    ("sbatch: error: Batch job submission failed: Invalid partition name specified", BadInput),
    ("sbatch: error: something else", ProviderError),
])
def test_slurm_refusals_map_to_what_the_policy_can_do(stderr, kind):
    assert type(slurm.classify(stderr, "sbatch of dlorch-d-n1")) is kind


@pytest.fixture
def provider(tmp_path):
    script = tmp_path / "agent.sh"
    script.write_text("#!/bin/sh\nexec dlorch agent --node-id \"$1\"\n")
    return slurm.SlurmProvider("lab", script, partition="gpu", sbatch_args=["--gres=gpu:1"], log_dir=tmp_path,
                               grace_s=90)


def test_slurm_command_lines(provider, tmp_path):
    cmd = provider.sbatch_command(LaunchRequest("slurm", Market.STATIC, 0.0, "n-7"))
    assert cmd[:2] == ["sbatch", "--parsable"]
    assert "--job-name=dlorch-lab-n-7" in cmd and "--comment=dlorch:deployment=lab" in cmd
    assert "--partition=gpu" in cmd and "--gres=gpu:1" in cmd
    assert not [a for a in cmd if a.startswith("--signal")]  # the script's own #SBATCH --signal holds
    assert f"--output={tmp_path / '%x-%j.out'}" in cmd
    assert "--export=ALL,DLORCH_NODE_ID=n-7,DLORCH_DEPLOYMENT=lab" in cmd
    assert cmd[-2:] == [str(tmp_path / "agent.sh"), "n-7"]
    other = provider.sbatch_command(LaunchRequest("long", Market.STATIC, 0.0, "n-8"))
    assert "--partition=long" in other and "--partition=gpu" not in other  # a type names the partition
    assert provider.scancel_command(["4", "5"], signal="TERM") == ["scancel", "--signal=TERM", "--batch", "4", "5"]
    assert provider.scancel_command(["4"]) == ["scancel", "4"]
    assert provider.squeue_command(["--name", "x"])[:3] == ["squeue", "--me", "--noheader"]


def test_slurm_parse_keeps_only_this_deployment(provider):
    out = "\n".join([
        "11|dlorch-lab-n-1|RUNNING|gpu|1796000000|1796000050|dlorch:deployment=lab",
        "12|dlorch-lab-n-2|PENDING|gpu|1796000010|N/A|dlorch:deployment=lab",
        "13|dlorch-lab-x-n-3|RUNNING|gpu|1796000000|1796000001|dlorch:deployment=lab-x",  # prefix look-alike
        "14|dlorch-lab-n-4|COMPLETING|gpu|1796000000|1796000002|dlorch:deployment=lab",
        "15|dlorch-lab-n-5|RUNNING|gpu|1796000000|1796000003|someone's comment",
        "16|my-own-job|RUNNING|cpu|1796000000|1796000003|",
        "17|dlorch-lab-n-6|RUNNING|gpu|1796000000|1796000003|dlorch:deployment=lab|with a bar",
        "garbage",
    ])
    found = {i.id: i for i in provider.parse(out)}
    assert set(found) == {"11", "12", "14"}
    assert (found["11"].node_id, found["11"].state, found["11"].launched_at) == ("n-1", InstanceState.RUNNING,
                                                                                  1796000050.0)
    assert (found["12"].state, found["12"].launched_at) == (InstanceState.PENDING, 1796000010.0)
    assert found["14"].state is InstanceState.STOPPING
    assert all(i.market is Market.STATIC and i.price_ceiling_usd_h == 0 and i.type == "gpu" for i in found.values())


def test_slurm_script_must_exist(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        slurm.SlurmProvider("lab", tmp_path / "missing.sh")


def test_slurm_without_sbatch_says_where_to_run(provider, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BadInput, match="login node"):
        provider.list()


def test_fault_rules_match_type_zone_market_and_call():
    req = LaunchRequest("g5.xlarge", Market.SPOT, 0.5, "n-1", zone="us-east-1a")
    assert Fault("capacity", type="g5.xlarge").matches("launch", req)
    assert not Fault("capacity", type="g4dn.xlarge").matches("launch", req)
    assert not Fault("capacity", zone="us-east-1b").matches("launch", req)
    assert not Fault("capacity", market=Market.ON_DEMAND).matches("launch", req)
    assert not Fault("throttled").matches("list", None)  # launch only unless told
    assert Fault("throttled", calls=("list",)).matches("list", None)
    assert not Fault("capacity", times=0).matches("launch", req)
    with pytest.raises(ValueError):
        Fault("meteor")
