"""infra/: the CloudFormation template (cfn-lint, deployed into moto's server over HTTP and checked resource by
resource) and the node user data run against a metadata server. The Slurm batch script and the systemd unit:
test_infra_agents.py."""

from __future__ import annotations

import ast
import base64
import http.server
import json
import os
import re
import stat
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_port

INFRA = REPO / "infra"
TEMPLATE = INFRA / "dlorch.yaml"
DLAMI = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
DEPLOYMENT = "lab-1"
REGION = "us-east-1"
CONTAINER = "123456789012.dkr.ecr.us-east-1.amazonaws.com/dlorch-node:cuda"
REDIS_URL = "rediss://:queue-pw-3141@queue.internal:6379/0"

# Resource types moto's CloudFormation skips while still reporting CREATE_COMPLETE (moto 5.x): the test
# asserts they are absent there, so a moto that starts creating them makes it fail and be extended.
MOTO_SKIPS = {"AWS::S3::BucketPolicy", "AWS::SecretsManager::Secret"}


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short forms (!Ref, !Sub, !GetAtt ...) read as their long forms."""


def _short_form(loader: yaml.SafeLoader, suffix: str, node: yaml.Node):
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        return {name: value.split(".", 1) if suffix == "GetAtt" else value}
    if isinstance(node, yaml.SequenceNode):
        return {name: loader.construct_sequence(node, deep=True)}
    return {name: loader.construct_mapping(node, deep=True)}


_CfnLoader.add_multi_constructor("!", _short_form)


def _template() -> dict:
    return yaml.load(TEMPLATE.read_text(), Loader=_CfnLoader)


# -- cfn-lint ------------------------------------------------------------------------------------------------

def test_cfn_lint_passes_every_template_without_a_warning():
    lint = Path(sys.executable).with_name("cfn-lint")
    if not lint.exists():
        pytest.skip("cfn-lint is not installed in this environment (pip install cfn-lint)")
    templates = sorted(INFRA.glob("*.yaml"))
    assert TEMPLATE in templates
    cp = subprocess.run([str(lint), *map(str, templates)], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr  # a bitmask: 2 errors, 4 warnings, 8 informational


# -- the stack in moto ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack():
    """The template deployed into moto's server over HTTP; yields the AWS clients and the stack's outputs."""
    import boto3
    from moto.server import ThreadedMotoServer

    saved = os.environ.get("MOTO_EC2_LOAD_DEFAULT_AMIS")
    os.environ["MOTO_EC2_LOAD_DEFAULT_AMIS"] = "false"  # seconds of EC2 set-up this test has no use for
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    # moto keeps its state per process, not per server: start from an empty account
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"))
    session = boto3.Session(aws_access_key_id="test", aws_secret_access_key="test", region_name=REGION)
    aws = {name: session.client(name, endpoint_url=url)
           for name in ("cloudformation", "ec2", "iam", "s3", "secretsmanager", "ssm")}
    vpc = aws["ec2"].create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
    subnets = [aws["ec2"].create_subnet(VpcId=vpc, CidrBlock=f"10.42.{i}.0/24")["Subnet"]["SubnetId"] for i in (1, 2)]
    ami = "ami-0dl0rc40000000001"  # the launch template does not look the image up
    # The Deep Learning AMI's public parameter is under the reserved /aws/ prefix, which moto neither knows nor
    # lets anyone write: the test puts the AMI under its own name and points the parameter's default there.
    aws["ssm"].put_parameter(Name="/test/dlami", Value=ami, Type="String")
    body = TEMPLATE.read_text()
    assert DLAMI in body
    params = {"DeploymentName": DEPLOYMENT, "VpcId": vpc, "SubnetIds": ",".join(subnets),
              "NodeContainerImage": CONTAINER, "RedisUrl": REDIS_URL}
    aws["cloudformation"].create_stack(
        StackName="dlorch-infra-test", TemplateBody=body.replace(DLAMI, "/test/dlami"),
        Capabilities=["CAPABILITY_IAM"], Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()])
    aws["cloudformation"].get_waiter("stack_create_complete").wait(
        StackName="dlorch-infra-test", WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    described = aws["cloudformation"].describe_stacks(StackName="dlorch-infra-test")["Stacks"][0]
    outputs = {o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", [])}
    resources = aws["cloudformation"].list_stack_resources(StackName="dlorch-infra-test")["StackResourceSummaries"]
    yield {"aws": aws, "outputs": outputs, "resources": resources, "vpc": vpc, "subnets": subnets, "ami": ami,
           "status": described["StackStatus"]}
    server.stop()
    if saved is None:
        os.environ.pop("MOTO_EC2_LOAD_DEFAULT_AMIS", None)
    else:
        os.environ["MOTO_EC2_LOAD_DEFAULT_AMIS"] = saved


def _policy(iam, role_arn: str, name: str) -> list[dict]:
    role = role_arn.rsplit("/", 1)[1]
    return _document(iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"])["Statement"]


def _document(document) -> dict:
    """A policy document as IAM's API returned it: a dict, or a URL-encoded string of JSON."""
    if isinstance(document, dict):
        return document
    text = urllib.parse.unquote(document)
    try:
        return json.loads(text)
    except ValueError:  # moto keeps a document CloudFormation made as Python's repr of it
        return ast.literal_eval(text)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def test_the_stack_deploys_and_the_bucket_is_encrypted(stack):
    assert stack["status"] == "CREATE_COMPLETE"
    s3, bucket = stack["aws"]["s3"], stack["outputs"]["Bucket"]
    s3.head_bucket(Bucket=bucket)
    rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    tags = {t["Key"]: t["Value"] for t in s3.get_bucket_tagging(Bucket=bucket)["TagSet"]}
    assert tags["dlorch:deployment"] == DEPLOYMENT
    assert stack["outputs"]["StoreUrl"] == f"s3://{bucket}/{DEPLOYMENT}"
    assert stack["outputs"]["Subnets"] == ",".join(stack["subnets"])
    ec2 = stack["aws"]["ec2"]
    named = ec2.describe_launch_templates(LaunchTemplateNames=[stack["outputs"]["LaunchTemplateName"]])
    assert named["LaunchTemplates"][0]["LaunchTemplateId"] == stack["outputs"]["LaunchTemplateId"]


def test_the_bucket_blocks_public_access_versions_and_expires_old_versions(stack):
    """moto's AWS::S3::Bucket applies only BucketEncryption and Tags: it drops the public access block,
    versioning, lifecycle and ownership. Asserted absent there (so a moto that applies them fails here and
    the checks move to the S3 API), and checked in the template, then applied through S3's own API, which
    validates them."""
    from botocore.exceptions import ClientError

    s3, bucket = stack["aws"]["s3"], stack["outputs"]["Bucket"]
    with pytest.raises(ClientError, match="NoSuchPublicAccessBlockConfiguration"):
        s3.get_public_access_block(Bucket=bucket)
    assert "Status" not in s3.get_bucket_versioning(Bucket=bucket)
    props = _template()["Resources"]["StoreBucket"]["Properties"]
    block = props["PublicAccessBlockConfiguration"]
    assert block == {"BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True,
                     "RestrictPublicBuckets": True}
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    rules = {r["Id"]: r for r in props["LifecycleConfiguration"]["Rules"]}
    assert rules["expire-deleted-checkpoints"]["Prefix"] == {"Fn::Sub": "${DeploymentName}/jobs/"}
    assert "ExpirationInDays" not in rules["expire-deleted-checkpoints"]  # a current checkpoint is gc's to judge
    assert rules["abort-incomplete-uploads"]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 1
    # The same settings through S3's API, with the deployment substituted: S3 (moto) validates their shape.
    s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration=block)
    assert s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"] == block
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration=props["VersioningConfiguration"])
    api_rules = []
    for r in props["LifecycleConfiguration"]["Rules"]:
        rule = {"ID": r["Id"], "Status": r["Status"],
                "Filter": {"Prefix": r["Prefix"]["Fn::Sub"].replace("${DeploymentName}", DEPLOYMENT)
                           if "Prefix" in r else ""}}
        if "NoncurrentVersionExpiration" in r:
            days = r["NoncurrentVersionExpiration"]["NoncurrentDays"]
            rule["NoncurrentVersionExpiration"] = {"NoncurrentDays": 7 if isinstance(days, dict) else days}
            rule["Expiration"] = {"ExpiredObjectDeleteMarker": r["ExpiredObjectDeleteMarker"]}
        if "AbortIncompleteMultipartUpload" in r:
            rule["AbortIncompleteMultipartUpload"] = r["AbortIncompleteMultipartUpload"]
        api_rules.append(rule)
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": api_rules})
    got = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert {r["ID"]: r["Filter"].get("Prefix") for r in got} == {
        "expire-deleted-checkpoints": f"{DEPLOYMENT}/jobs/", "expire-ledger-history": f"{DEPLOYMENT}/ledger/",
        "abort-incomplete-uploads": ""}


def test_what_moto_skips_is_absent_there_and_declared_in_the_template(stack):
    """moto reports the skipped types' resources as created without creating them (no secret exists)."""
    from botocore.exceptions import ClientError

    resources = _template()["Resources"]
    assert {r["Type"] for r in resources.values()} & MOTO_SKIPS == MOTO_SKIPS
    sm = stack["aws"]["secretsmanager"]
    assert sm.list_secrets()["SecretList"] == []
    for logical in ("HmacKeySecret", "RedisUrlSecret"):
        name = resources[logical]["Properties"]["Name"]["Fn::Sub"].replace("${DeploymentName}", DEPLOYMENT)
        with pytest.raises(ClientError, match="ResourceNotFoundException"):
            sm.describe_secret(SecretId=name)
    hmac = resources["HmacKeySecret"]["Properties"]
    assert hmac["GenerateSecretString"]["PasswordLength"] >= 32 and "SecretString" not in hmac  # made by AWS
    assert resources["RedisUrlSecret"]["Properties"]["SecretString"] == {"Ref": "RedisUrl"}
    assert _template()["Parameters"]["RedisUrl"]["NoEcho"] is True
    deny = resources["StoreBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"][0]
    assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_the_roles_are_least_privilege(stack):
    iam, out = stack["aws"]["iam"], stack["outputs"]
    bucket_arn = f"arn:aws:s3:::{out['Bucket']}"
    for role_arn, profile_arn, policy in ((out["NodeRoleArn"], out["NodeInstanceProfileArn"], "dlorch-node"),
                                          (out["OrchestratorRoleArn"], out["OrchestratorInstanceProfileArn"],
                                           "dlorch-orchestrator")):
        role = iam.get_role(RoleName=role_arn.rsplit("/", 1)[1])["Role"]
        trust = _document(role["AssumeRolePolicyDocument"])
        assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
        profile = iam.get_instance_profile(InstanceProfileName=profile_arn.rsplit("/", 1)[1])["InstanceProfile"]
        assert [r["Arn"] for r in profile["Roles"]] == [role_arn]
        statements = _policy(iam, role_arn, policy)
        for s in statements:
            assert s["Effect"] == "Allow"
            actions = _as_list(s["Action"])
            assert "*" not in actions and not any(a.endswith(":*") for a in actions), s
            for a in actions:
                if a.startswith("s3:"):  # only the deployment's prefix of the bucket
                    for r in _as_list(s["Resource"]):
                        assert r in (bucket_arn, f"{bucket_arn}/{DEPLOYMENT}", f"{bucket_arn}/{DEPLOYMENT}/*"), s
                    if a == "s3:ListBucket":
                        assert s["Condition"]["StringLike"]["s3:prefix"] == [DEPLOYMENT, f"{DEPLOYMENT}/*"]
                if a == "secretsmanager:GetSecretValue":
                    assert len(_as_list(s["Resource"])) == 2 and "*" not in _as_list(s["Resource"])
            if _as_list(s["Resource"]) == ["*"]:  # only what AWS cannot scope to a resource
                assert set(actions) <= {"ec2:Describe*", "ecr:GetAuthorizationToken"}, s
    orch = {s["Sid"]: s for s in _policy(iam, out["OrchestratorRoleArn"], "dlorch-orchestrator")}
    template_arn = f"launch-template/{out['LaunchTemplateId']}"
    launch = orch["LaunchTaggedInstances"]
    assert launch["Resource"].endswith(":instance/*")
    assert launch["Condition"]["StringEquals"] == {"aws:RequestTag/dlorch:deployment": DEPLOYMENT}
    assert launch["Condition"]["ArnLike"]["ec2:LaunchTemplate"].endswith(template_arn)
    assert not any(r.endswith(":instance/*") for r in orch["LaunchFromTheTemplate"]["Resource"])
    assert orch["TagOnLaunchOnly"]["Condition"] == {"StringEquals": {"ec2:CreateAction": "RunInstances"}}
    assert orch["TerminateOwnInstances"]["Condition"] == {
        "StringEquals": {"aws:ResourceTag/dlorch:deployment": DEPLOYMENT}}
    assert orch["PassOnlyTheNodeRole"]["Resource"] == out["NodeRoleArn"]
    assert orch["PassOnlyTheNodeRole"]["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    node_actions = {a for s in _policy(iam, out["NodeRoleArn"], "dlorch-node") for a in _as_list(s["Action"])}
    assert not {a for a in node_actions if a.startswith(("ec2:", "iam:"))}  # a node launches and passes nothing


def test_the_security_group_lets_nothing_in(stack):
    ec2 = stack["aws"]["ec2"]
    group = ec2.describe_security_groups(GroupIds=[stack["outputs"]["NodeSecurityGroupId"]])["SecurityGroups"][0]
    assert group["VpcId"] == stack["vpc"]
    assert group["IpPermissions"] == []
    assert {t["Key"]: t["Value"] for t in group["Tags"]}["dlorch:deployment"] == DEPLOYMENT


def test_the_launch_template_requires_imdsv2_and_runs_the_node_profile(stack):
    ec2, out = stack["aws"]["ec2"], stack["outputs"]
    version = ec2.describe_launch_template_versions(LaunchTemplateId=out["LaunchTemplateId"])["LaunchTemplateVersions"][0]
    data = version["LaunchTemplateData"]
    assert data["MetadataOptions"] == {"HttpTokens": "required", "HttpPutResponseHopLimit": 2,
                                       "HttpEndpoint": "enabled", "InstanceMetadataTags": "enabled"}
    assert data["IamInstanceProfile"]["Arn"] == out["NodeInstanceProfileArn"]
    assert data["ImageId"] == stack["ami"]  # resolved through the SSM parameter
    assert data["SecurityGroupIds"] == [out["NodeSecurityGroupId"]]
    assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert data["BlockDeviceMappings"][0]["Ebs"]["Encrypted"] is True
    user_data = base64.b64decode(data["UserData"]).decode()
    assert "queue-pw-3141" not in user_data and "DLORCH_SECRET=$hmac_key" in user_data  # secrets fetched, not baked
    assert f"s3://{out['Bucket']}/{DEPLOYMENT}" in user_data


def test_the_node_image_and_the_launch_template_agree_on_the_unprivileged_user():
    dockerfile = (REPO / "Dockerfile.node").read_text()
    uid = re.search(r"useradd [^\n]*--uid (\d+) --gid (\d+)", dockerfile)
    assert uid and uid.group(1) == uid.group(2) != "0"
    user_data = _template()["Resources"]["NodeLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]
    script = user_data["Fn::Base64"]["Fn::Sub"]
    assert f"--user {uid.group(1)}:{uid.group(1)}" in script and f"-o {uid.group(1)} -g {uid.group(1)}" in script
    assert 'ENTRYPOINT ["dlorch", "agent"]' in dockerfile and "STOPSIGNAL SIGTERM" in dockerfile


# -- the user data, run against a metadata server --------------------------------------------------------------

class _Imds(http.server.BaseHTTPRequestHandler):
    """IMDSv2 as far as the user data uses it: a PUT token, then metadata only with that token."""

    token = "imds-token-1"
    values = {"/latest/meta-data/tags/instance/dlorch:node-id": "n-20261202-abc",
              "/latest/meta-data/placement/region": REGION}

    def do_PUT(self):  # noqa: N802
        ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        self._reply(200 if ok else 400, self.token if ok else "")

    def do_GET(self):  # noqa: N802
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            return self._reply(401, "")
        value = self.values.get(self.path)
        self._reply(200 if value is not None else 404, value or "")

    def _reply(self, code: int, body: str) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args) -> None:
        pass


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def test_the_user_data_reads_its_node_tag_and_secrets_and_starts_the_agent_unprivileged(stack, tmp_path):
    ec2, out = stack["aws"]["ec2"], stack["outputs"]
    data = ec2.describe_launch_template_versions(LaunchTemplateId=out["LaunchTemplateId"])["LaunchTemplateVersions"][0]
    script = base64.b64decode(data["LaunchTemplateData"]["UserData"]).decode()
    secret_ids = re.findall(r"\$\(secret '([^']+)'\)", script)
    assert len(secret_ids) == 2
    imds = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Imds)
    threading.Thread(target=imds.serve_forever, daemon=True).start()
    root = tmp_path / "root"
    for d in ("etc", "var/log", "var/lib"):
        (root / d).mkdir(parents=True)
    # The machine's paths and the metadata address, moved into this test's directories and server
    script = (script.replace("http://169.254.169.254", f"http://127.0.0.1:{imds.server_port}")
              .replace("/etc/dlorch", f"{root}/etc/dlorch").replace("/var/log/", f"{root}/var/log/")
              .replace("/var/lib/dlorch", f"{root}/var/lib/dlorch"))
    if os.geteuid() != 0:
        script = script.replace("-o 10001 -g 10001 ", "")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    # aws: the two secrets by the ids the template gave the user data, and an ECR login password
    _fake(bin_dir, "aws", f"""echo "aws $*" >>{calls}
case "$*" in
  *'--secret-id {secret_ids[0]} '*) echo hmac-key-2718 ;;
  *'--secret-id {secret_ids[1]} '*) echo '{REDIS_URL}' ;;
  "ecr get-login-password --region {REGION}") echo ecr-pw ;;
  *) echo "unexpected aws call" >&2; exit 255 ;;
esac
""")
    _fake(bin_dir, "docker", f"""echo "docker $*" >>{calls}
[ "$1" = login ] && echo "login-password $(cat)" >>{calls}
exit 0
""")
    cp = subprocess.run(["bash", "-c", script], env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, capture_output=True,
                        text=True, timeout=60)
    boot_log = (root / "var/log/dlorch-boot.log").read_text()
    imds.shutdown()
    assert cp.returncode == 0, boot_log
    assert "agent n-20261202-abc started" in boot_log
    env_file = root / "etc/dlorch/agent.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "etc/dlorch").stat().st_mode) == 0o700
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert env == {"DLORCH_SECRET": "hmac-key-2718", "DLORCH_QUEUE": REDIS_URL, "DLORCH_DEPLOYMENT": DEPLOYMENT,
                   "DLORCH_STORE": f"s3://{out['Bucket']}/{DEPLOYMENT}", "AWS_DEFAULT_REGION": REGION}
    log = calls.read_text()
    assert "login-password ecr-pw" in log and f"docker pull {CONTAINER}" in log
    run = next(line for line in log.splitlines() if line.startswith("docker run"))
    assert "--user 10001:10001" in run and "--cap-drop ALL" in run and "--read-only" in run
    assert f"--env-file {env_file}" in run
    assert run.endswith(f"{CONTAINER} --node-id n-20261202-abc --spot-notices ec2")
    assert "hmac-key-2718" not in run and "queue-pw" not in run  # secrets only in the 0600 file
    assert "hmac-key-2718" not in boot_log and "queue-pw" not in boot_log


def test_the_user_data_refuses_a_node_id_tag_that_is_not_an_id(stack, tmp_path, monkeypatch):
    ec2, out = stack["aws"]["ec2"], stack["outputs"]
    data = ec2.describe_launch_template_versions(LaunchTemplateId=out["LaunchTemplateId"])["LaunchTemplateVersions"][0]
    script = base64.b64decode(data["LaunchTemplateData"]["UserData"]).decode()
    monkeypatch.setitem(_Imds.values, "/latest/meta-data/tags/instance/dlorch:node-id", "../../etc;rm")
    imds = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Imds)
    threading.Thread(target=imds.serve_forever, daemon=True).start()
    log = tmp_path / "boot.log"
    script = (script.replace("http://169.254.169.254", f"http://127.0.0.1:{imds.server_port}")
              .replace("/var/log/dlorch-boot.log", str(log)).replace("/etc/dlorch", str(tmp_path / "etc")))
    cp = subprocess.run(["bash", "-c", script], env={"PATH": "/usr/bin:/bin"}, capture_output=True, timeout=60)
    imds.shutdown()
    assert cp.returncode == 1
    assert "tag dlorch:node-id is missing or not an id" in log.read_text()
    assert not (tmp_path / "etc").exists()  # stopped before any secret was fetched
