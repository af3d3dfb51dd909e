"""The EC2 compute provider (boto3): launch through a launch template, list by the deployment tag, terminate.

Every instance carries the tags ``dlorch:deployment=<name>``, ``dlorch:node-id=<node id>`` and
``Name=dlorch-<node id>`` (and ``dlorch:price-ceiling=<$/h>``, the most it may bill, so that a restarted
controller reserves the right amount for instances it re-adopts). The instance's user data (in the launch
template) reads its node id from the metadata tags and runs ``dlorch agent --node-id <id>``.

Launches are idempotent by node id: RunInstances gets the node id as its ClientToken (a retry after a
crash returns the first machine), and a live instance already tagged with the node id is returned without
a call to RunInstances. IMDSv2 is required. Spot requests are one-time, terminate on interruption, and
bid the request's price ceiling.

``list`` reports each spot instance's spot price, since when it is in effect and when it was read
(DescribeSpotPriceHistory, at most one call per ``SPOT_PRICE_TTL_S``): the cap counts the seconds it covers
at it, and cost reports what was billed; ``ended`` dates the end of instances that
are no longer listed from their state transition ("User initiated (2026-12-02 10:00:00 GMT)"): EC2 stops
billing an instance when it enters shutting-down.
"""

from __future__ import annotations

import calendar
import dataclasses
import hashlib
import re
import time
from typing import Any, Iterable

from dlorch.core.errors import BadInput
from dlorch.core.spec import check_id
from dlorch.orchestrator.fleet.model import (
    CapacityError,
    Instance,
    InstanceState,
    LaunchRequest,
    Market,
    ProviderError,
    QuotaError,
    ThrottledError,
)

NAME = "ec2"
TAG_DEPLOYMENT = "dlorch:deployment"
TAG_NODE = "dlorch:node-id"
TAG_CEILING = "dlorch:price-ceiling"
SPOT_PRICE_TTL_S = 60.0  # seconds after a read count at the ceiling until the next
PRODUCT = "Linux/UNIX"
TRANSITION_TIME = re.compile(r"\((\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) (?:GMT|UTC)\)")
TERMINATE_BATCH = 200  # ids per call: a filter of DescribeInstances takes a bounded number of values (200)

# EC2 error codes -> what the policy may do about them
CAPACITY_CODES = {"InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
                  "InsufficientReservedInstanceCapacity", "SpotMaxPriceTooLow", "Unsupported",
                  "InsufficientFreeAddressesInSubnet"}
QUOTA_CODES = {"VcpuLimitExceeded", "InstanceLimitExceeded", "MaxSpotInstanceCountExceeded",
               "SpotInstanceCountExceeded"}
THROTTLE_CODES = {"RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequestsException"}
CONFIG_CODES = {"AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "SignatureDoesNotMatch",
                "InvalidLaunchTemplateName.NotFoundException", "InvalidLaunchTemplateId.NotFound",
                "InvalidLaunchTemplateId.Malformed", "InvalidLaunchTemplateName.MalformedException"}

STATES = {"pending": InstanceState.PENDING, "running": InstanceState.RUNNING,
          "shutting-down": InstanceState.STOPPING, "stopping": InstanceState.STOPPING,
          "stopped": InstanceState.STOPPING, "terminated": InstanceState.TERMINATED}
LIVE_STATES = ["pending", "running", "shutting-down", "stopping", "stopped"]


def client_token(node_id: str) -> str:
    """RunInstances' idempotency token for a node id (at most 64 ASCII characters)."""
    return node_id if len(node_id) <= 64 else hashlib.sha256(node_id.encode()).hexdigest()


def classify(error: Exception, doing: str) -> Exception:
    """The provider error (or, for a wrong setting, BadInput) a botocore error stands for, with one line."""
    from botocore.exceptions import ClientError, NoCredentialsError, NoRegionError

    if isinstance(error, (NoCredentialsError, NoRegionError)):
        return BadInput(f"EC2 {doing}: {error}; configure AWS credentials and region (aws configure, or "
                        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_DEFAULT_REGION)")
    if not isinstance(error, ClientError):
        return ProviderError(f"EC2 {doing}: {' '.join(str(error).split())}")
    code = error.response.get("Error", {}).get("Code", "")
    message = " ".join(str(error.response.get("Error", {}).get("Message", "")).split())
    line = f"EC2 {doing}: {code}: {message}"
    if code in CAPACITY_CODES:
        return CapacityError(line)
    if code in QUOTA_CODES:
        return QuotaError(line)
    if code in THROTTLE_CODES:
        return ThrottledError(line)
    if code in CONFIG_CODES:
        return BadInput(f"{line}; check the launch template name, region and the credentials' EC2 permissions "
                        "(see infra/)")
    return ProviderError(line)


class Ec2Provider:
    """EC2 instances of one deployment.

    Args:
        deployment: the deployment name, written to and filtered by the ``dlorch:deployment`` tag.
        region: the AWS region.
        launch_template: the launch template's name (or ``lt-…`` id) holding AMI, role, network, user data.
        subnets: subnets to launch into (one per zone); empty: the launch template's network settings.
        session: a ``boto3.Session``; None: the default credential chain.
        endpoint_url: another EC2 endpoint (moto's server in the tests).
    """

    name = NAME

    def __init__(self, deployment: str, region: str, launch_template: str, subnets: Iterable[str] = (),
                 session: Any = None, endpoint_url: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.deployment = check_id("deployment", deployment)
        self.region, self.launch_template, self.subnets = region, launch_template, tuple(subnets)
        session = session or boto3.Session()
        # few retries: a throttled or failed launch is the policy's to handle on its next tick
        self.ec2 = session.client("ec2", region_name=region, endpoint_url=endpoint_url,
                                  config=Config(retries={"mode": "standard", "max_attempts": 2}))
        self._subnet_zones: dict[str, str] | None = None
        self._spot_prices: dict[tuple[str, str | None], float] = {}
        self._spot_prices_at = -float("inf")
        self._spot_asked: set[tuple[str, str | None]] = set()

    # -- the Provider seam ---------------------------------------------------------------------------------

    def launch(self, request: LaunchRequest) -> Instance:
        """RunInstances through the launch template; returns the instance (pending).

        Raises:
            CapacityError, QuotaError, ThrottledError: as EC2 answered; ProviderError: any other refusal.
            BadInput: the launch template, region or credentials are wrong.
        """
        node_id = check_id("node", request.node_id)
        if request.market is Market.STATIC:
            raise ProviderError("EC2 launch: market 'static' is not an EC2 market; use spot or on-demand")
        existing = self._describe([{"Name": f"tag:{TAG_NODE}", "Values": [node_id]},
                                   {"Name": "instance-state-name", "Values": ["pending", "running"]}])
        if existing:
            return existing[0]
        template = ({"LaunchTemplateId": self.launch_template} if self.launch_template.startswith("lt-")
                    else {"LaunchTemplateName": self.launch_template})
        tags = [{"Key": TAG_DEPLOYMENT, "Value": self.deployment}, {"Key": TAG_NODE, "Value": node_id},
                {"Key": "Name", "Value": f"dlorch-{node_id}"},
                {"Key": TAG_CEILING, "Value": f"{request.price_ceiling_usd_h:.6g}"}]
        params: dict[str, Any] = {
            "LaunchTemplate": template, "InstanceType": request.type, "MinCount": 1, "MaxCount": 1,
            "ClientToken": client_token(node_id),
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags},
                                  {"ResourceType": "volume", "Tags": tags[:2]}],
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                                "InstanceMetadataTags": "enabled"},
        }
        if request.market is Market.SPOT:
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                "MaxPrice": f"{request.price_ceiling_usd_h:.6g}", "SpotInstanceType": "one-time",
                "InstanceInterruptionBehavior": "terminate"}}
        subnet = self._subnet_for(request.zone)
        if subnet is not None:
            params["SubnetId"] = subnet
        elif request.zone:
            params["Placement"] = {"AvailabilityZone": request.zone}
        try:
            reply = self.ec2.run_instances(**params)
        except Exception as e:  # botocore's errors, mapped to what the policy can act on
            raise classify(e, f"launch of {request.type} ({request.market.value}) for {node_id}") from None
        return self._instance(reply["Instances"][0])

    def terminate(self, instance_ids: list[str]) -> None:
        """TerminateInstances in batches; ids that are not this deployment's (or gone) are left alone."""
        ids = list(dict.fromkeys(instance_ids))
        for start in range(0, len(ids), TERMINATE_BATCH):
            batch = ids[start:start + TERMINATE_BATCH]
            # only instances tagged with this deployment: a stale id must never end another deployment's machine
            ours = [i.id for i in self._describe([{"Name": "instance-id", "Values": batch}])]
            if not ours:
                continue
            try:
                self.ec2.terminate_instances(InstanceIds=ours)
            except Exception as e:
                raise classify(e, f"terminate of {len(ours)} instance(s)") from None

    def list(self) -> list[Instance]:
        """This deployment's instances that are not terminated (DescribeInstances by tag, all pages), spot ones
        with their current spot price where EC2 reports it."""
        found = self._describe([])
        spot = {(i.type, i.zone) for i in found if i.market is Market.SPOT}
        if not spot:
            return found
        prices = self._spot_price(spot)
        out = []
        for i in found:
            seen = prices.get((i.type, i.zone)) if i.market is Market.SPOT else None
            if seen is not None:
                i = dataclasses.replace(i, price_usd_h=seen[0], price_since=seen[1], price_as_of=self._spot_prices_at)
            out.append(i)
        return out

    def ended(self, instance_ids: list[str]) -> dict[str, float]:
        """When these instances (this deployment's, no longer running) entered shutting-down, where EC2 states
        it in their state transition reason."""
        out: dict[str, float] = {}
        ids = list(dict.fromkeys(instance_ids))
        for start in range(0, len(ids), TERMINATE_BATCH):
            filters = [{"Name": f"tag:{TAG_DEPLOYMENT}", "Values": [self.deployment]},
                       {"Name": "instance-id", "Values": ids[start:start + TERMINATE_BATCH]},
                       {"Name": "instance-state-name", "Values": ["shutting-down", "terminated"]}]
            try:
                for page in self.ec2.get_paginator("describe_instances").paginate(Filters=filters):
                    for reservation in page.get("Reservations", []):
                        for raw in reservation.get("Instances", []):
                            at = transition_time(raw.get("StateTransitionReason", ""))
                            if at is not None:
                                out[raw["InstanceId"]] = at
            except Exception as e:
                raise classify(e, "describe of ended instances") from None
        return out

    # -- helpers -------------------------------------------------------------------------------------------

    def _describe(self, filters: list[dict]) -> list[Instance]:
        filters = [{"Name": f"tag:{TAG_DEPLOYMENT}", "Values": [self.deployment]},
                   {"Name": "instance-state-name", "Values": LIVE_STATES}, *filters]
        found = []
        try:
            for page in self.ec2.get_paginator("describe_instances").paginate(Filters=filters):
                for reservation in page.get("Reservations", []):
                    for raw in reservation.get("Instances", []):
                        instance = self._instance(raw)
                        if instance.state is not InstanceState.TERMINATED:
                            found.append(instance)
        except Exception as e:
            raise classify(e, "list of instances") from None
        return found

    def _spot_price(self, wanted: set[tuple[str, str | None]]) -> dict[tuple[str, str | None], tuple]:
        """The spot price in effect of each (type, zone) and since when; an unanswered lookup leaves the price
        table's (for reports) and the ceiling (for the cap)."""
        now = time.time()
        if now - self._spot_prices_at < SPOT_PRICE_TTL_S and wanted <= self._spot_asked:
            return self._spot_prices
        self._spot_asked = self._spot_asked | wanted
        try:
            reply = self.ec2.describe_spot_price_history(InstanceTypes=sorted({t for t, _ in wanted}),
                                                         ProductDescriptions=[PRODUCT], StartTime=now)
        except Exception:  # a lookup never blocks the list: the last read stands, as of when it was made
            return self._spot_prices
        self._spot_prices_at = now
        latest: dict[tuple[str, str | None], tuple] = {}
        for row in reply.get("SpotPriceHistory", []):
            try:
                key, price = (row["InstanceType"], row.get("AvailabilityZone")), float(row["SpotPrice"])
            except (KeyError, TypeError, ValueError):
                continue
            stamp = row.get("Timestamp")
            at = stamp.timestamp() if hasattr(stamp, "timestamp") else None  # None: since when is unknown
            if key not in latest or (at or -float("inf")) >= (latest[key][0] or -float("inf")):
                latest[key] = (at, price)
        prices = {k: (p, at) for k, (at, p) in latest.items()}
        for type_, zone in wanted:  # an instance without a zone takes its type's dearest zone
            if zone is None and (type_, None) not in prices:
                zoned = [(p, at) for (t, _), (p, at) in prices.items() if t == type_]
                if zoned:
                    stamps = [at for _, at in zoned]
                    prices[(type_, None)] = (max(p for p, _ in zoned), None if None in stamps else max(stamps))
        self._spot_prices = prices
        return prices

    def _subnet_for(self, zone: str | None) -> str | None:
        if not self.subnets:
            return None
        if zone is None:
            return self.subnets[0]
        if self._subnet_zones is None:
            try:
                reply = self.ec2.describe_subnets(SubnetIds=list(self.subnets))
            except Exception as e:
                raise classify(e, "describe of the subnets") from None
            self._subnet_zones = {s["SubnetId"]: s["AvailabilityZone"] for s in reply.get("Subnets", [])}
        for subnet in self.subnets:
            if self._subnet_zones.get(subnet) == zone:
                return subnet
        raise CapacityError(f"EC2 launch: none of the subnets {', '.join(self.subnets)} is in zone {zone}")

    def _instance(self, raw: dict) -> Instance:
        tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
        market = Market.SPOT if raw.get("InstanceLifecycle") == "spot" else Market.ON_DEMAND
        try:
            ceiling = float(tags.get(TAG_CEILING, "nan"))
        except ValueError:
            ceiling = float("nan")
        if ceiling != ceiling:  # not launched by dlorch (a hand-tagged machine): the controller prices it
            ceiling = 0.0
        state = STATES.get(raw.get("State", {}).get("Name", ""), InstanceState.PENDING)
        launched = raw.get("LaunchTime")
        return Instance(id=raw["InstanceId"], provider=NAME, type=raw.get("InstanceType", ""), market=market,
                        price_ceiling_usd_h=ceiling, state=state,
                        launched_at=launched.timestamp() if hasattr(launched, "timestamp") else 0.0,
                        node_id=tags.get(TAG_NODE), zone=raw.get("Placement", {}).get("AvailabilityZone"))


def transition_time(reason: str) -> float | None:
    """The epoch seconds in an EC2 state transition reason ("User initiated (2026-12-02 10:00:00 GMT)")."""
    match = TRANSITION_TIME.search(reason or "")
    if match is None:
        return None
    return float(calendar.timegm(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")))
