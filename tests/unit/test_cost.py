"""Cost attribution (orchestrator/fleet/cost.py) and the price table (orchestrator/fleet/prices.py)."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlorch.core.errors import BadInput
from dlorch.orchestrator.fleet.cost import (
    BillingRecord, LeaseInterval, attribute, billed_end, day_of, spent_usd,
)
from dlorch.orchestrator.fleet.model import Market
from dlorch.orchestrator.fleet.prices import load_prices

DAY = 1_796_083_200.0  # 2026-12-01 00:00 UTC


def test_leased_seconds_go_to_their_jobs_and_the_rest_is_idle():
    billing = [BillingRecord("i-1", "g5.xlarge", "spot", 3.6, DAY + 0, DAY + 1000, node_id="n1")]
    leases = [LeaseInterval("j-a", "t1", "n1", DAY + 100, DAY + 400, variant="unet-s"),
              LeaseInterval("j-b", "t2", "n1", DAY + 300, DAY + 600, variant="unet-l")]
    r = attribute(billing, leases, now=DAY + 5000)
    assert r.total_usd == pytest.approx(1.0)
    # 100-300 a alone, 300-400 shared, 400-600 b alone; 0-100 and 600-1000 idle
    assert r.per_job == pytest.approx({"j-a": 0.25, "j-b": 0.25})
    assert r.per_variant == pytest.approx({"unet-s": 0.25, "unet-l": 0.25})
    assert r.idle_usd == pytest.approx(0.5) and r.idle_share == pytest.approx(0.5)
    assert r.per_type == pytest.approx({"g5.xlarge": 1.0})
    assert r.reconciles(tolerance=1e-9)


def test_days_split_at_utc_midnight_and_running_records_end_at_now():
    billing = [BillingRecord("i-1", "g4dn.xlarge", "on-demand", 3.6, DAY - 200, None, node_id="n1")]
    r = attribute(billing, [LeaseInterval("j", "t", "n1", DAY - 100, None)], now=DAY + 300)
    assert r.per_day == pytest.approx({"2026-11-30": 0.2, "2026-12-01": 0.3})
    assert r.per_job == pytest.approx({"j": 0.4}) and r.idle_usd == pytest.approx(0.1)
    assert day_of(DAY) == "2026-12-01"


def test_leases_on_unpaid_nodes_cost_nothing():
    r = attribute([], [LeaseInterval("j", "t", "lab-pc", DAY, DAY + 100)], now=DAY + 200)
    assert r.total_usd == 0 and r.per_job == {} and r.reconciles()


def test_billing_minimum_and_spent_in_a_period():
    assert billed_end(DAY, DAY + 10, billing_min_s=60) == DAY + 60
    assert billed_end(DAY, DAY + 90.2, billing_min_s=60, granularity_s=1) == DAY + 91
    stopped = BillingRecord("i-1", "t", "spot", 3.6, DAY, billed_end(DAY, DAY + 10))
    running = BillingRecord("i-2", "t", "spot", 3.6, DAY + 100, None)
    # the stopped one's minimum counts whole; the running one in whole seconds begun
    assert spent_usd([stopped, running], since=DAY - 10, now=DAY + 110.5) == pytest.approx((60 + 11) / 1000)
    assert spent_usd([stopped, running], since=DAY + 50, now=DAY + 110.5) == pytest.approx((10 + 11) / 1000)


def test_records_round_trip_as_json_and_refuse_bad_input():
    b = BillingRecord("i-1", "g5.xlarge", "spot", 0.4, DAY, None, node_id="n1", provider="ec2")
    l = LeaseInterval("j", "tok", "n1", DAY, DAY + 5, variant="v")
    assert BillingRecord.from_json(json.loads(json.dumps(b.to_json()))) == b
    assert LeaseInterval.from_json(json.loads(json.dumps(l.to_json()))) == l
    for bad in ({**b.to_json(), "price_usd_h": "cheap"}, {**b.to_json(), "extra": 1}, ["x"],
                {k: v for k, v in b.to_json().items() if k != "type"}):
        with pytest.raises(BadInput) as e:
            BillingRecord.from_json(bad)
        assert "\n" not in str(e.value)


intervals = st.tuples(st.floats(0, 3 * 86_400), st.floats(1, 20_000))


@settings(max_examples=150, deadline=None)
@given(billing=st.lists(st.tuples(st.integers(0, 3), intervals, st.floats(0, 5)), max_size=6),
       leases=st.lists(st.tuples(st.integers(0, 4), intervals, st.integers(0, 5), st.sampled_from("abc")),
                       max_size=12))
def test_property_every_family_of_lines_sums_to_the_total(billing, leases):
    records = [BillingRecord(f"i-{k}", f"type{n % 2}", "spot", price, DAY + s, DAY + s + d, node_id=f"n{n}")
               for k, (n, (s, d), price) in enumerate(billing)]
    held = [LeaseInterval(f"j{j}", f"t{k}", f"n{n}", DAY + s, DAY + s + d, variant=v)
            for k, (n, (s, d), j, v) in enumerate(leases)]
    r = attribute(records, held, now=DAY + 10 * 86_400)
    assert r.reconciles(tolerance=1e-6)
    assert r.total_usd == pytest.approx(sum(x.price_usd_h * (x.end - x.start) / 3600 for x in records))
    assert 0 <= r.idle_node_s <= r.paid_node_s + 1e-6


# --- prices ------------------------------------------------------------------------------------------------------

def test_shipped_price_table():
    p = load_prices(env={})
    assert p.as_of == "2026-12-01" and "AWS public price list, on-demand Linux, us-east-1" in p.source
    assert p.table[("g4dn.xlarge", "on-demand")] == 0.526
    assert p.ceiling("g5.xlarge", Market.SPOT) == p.table[("g5.xlarge", "on-demand")]
    assert p.ceiling("g5.xlarge", "spot") > p.table[("g5.xlarge", "spot")]
    assert p.table[("local", "static")] == 0 and p.table[("slurm", "static")] == 0
    assert p.gpus["g5.xlarge"] == 1 and p.gpus["c6i.2xlarge"] == 0 and p.billing_min_s == 60
    with pytest.raises(BadInput, match="no on-demand price for instance type 'x1.mega'"):
        p.ceiling("x1.mega", "on-demand")


def test_a_prices_file_overrides_per_field(tmp_path):
    f = tmp_path / "prices.json"
    f.write_text(json.dumps({"as_of": "2027-01-05", "types": {"local": {"static": 0.05},
                                                              "g5.xlarge": {"spot": 0.5, "spot_ceiling": 0.7}}}))
    p = load_prices(env={"DLORCH_PRICES": str(f)})
    assert p.as_of == "2027-01-05" and p.table[("local", "static")] == 0.05
    assert p.table[("g5.xlarge", "on-demand")] == 1.006 and p.ceiling("g5.xlarge", "spot") == 0.7
    assert load_prices(prices_file=f, env={}).table == p.table


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON"),
    ('{"as_of": "yesterday"}', '"as_of" must be a date'),
    ('{"types": {"g5.xlarge": {"on_demand": -1}}}', "types.g5.xlarge.on_demand must be a non-negative number"),
    ('{"types": {"g5.xlarge": {"ondemand": 1}}}', "unknown field 'ondemand'"),
    ('{"types": {"new.type": {"gpus": 1}}}', "types.new.type has no price"),
    ('{"types": {"g5.xlarge": {"gpus": 1.5}}}', "gpus must be a whole number"),
    ('[1, 2]', "must hold a JSON object"),
])
def test_bad_prices_files_get_one_line(tmp_path, content, message):
    f = tmp_path / "p.json"
    f.write_text(content)
    with pytest.raises(BadInput) as e:
        load_prices(prices_file=f, env={})
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BadInput, match="not found"):
        load_prices(prices_file=tmp_path / "missing.json", env={})


def test_reported_prices_bill_where_they_are_known_and_the_cap_counts_the_ceiling_elsewhere():
    from dlorch.orchestrator.fleet.records import InstanceRecord, spent_usd as cap_spent

    r = InstanceRecord(node_id="n-1", provider="ec2", type="g5.xlarge", market="spot", ceiling_usd_h=1.0,
                       price_usd_h=0.4, reserve_usd=0.0, requested_at=DAY, state="running", instance_id="i-1",
                       launched_at=DAY + 10)
    assert [(b.price_usd_h, b.start, b.end) for b in r.billings(60, 1)] == [(0.4, DAY + 10, None)]
    assert r.cap_billings(60, 1, DAY + 50.5)[0].price_usd_h == 1.0  # nothing reported: the ceiling
    assert r.observe(DAY, DAY + 40, 0.3)  # in effect since before the launch, read at +40
    assert r.observe(DAY, DAY + 70, 0.3) and not r.observe(DAY, DAY + 60, 0.3)  # known for longer; not shorter
    assert [(b.price_usd_h, b.start, b.end) for b in r.cap_billings(60, 1, DAY + 50.5)] == [(0.3, DAY + 10, DAY + 51)]
    assert r.observe(DAY + 1810, DAY + 1900, 0.6) and not r.observe(None, DAY + 1950, float("nan"))
    r.state, r.ended_at = "ended", DAY + 3610
    # reports: each price until the next (the table's before the first)
    assert [(b.price_usd_h, b.start, b.end) for b in r.billings(60, 1)] == [
        (0.3, DAY + 10, DAY + 1810), (0.6, DAY + 1810, DAY + 3610)]
    assert attribute(r.billings(60, 1), [], now=DAY + 9999).total_usd == pytest.approx(0.3 * 0.5 + 0.6 * 0.5)
    # the cap: a price only where it is known to have been in effect, the ceiling in the gaps
    assert [(b.price_usd_h, b.start, b.end) for b in r.cap_billings(60, 1, DAY + 9999)] == [
        (0.3, DAY + 10, DAY + 70), (1.0, DAY + 70, DAY + 1810), (0.6, DAY + 1810, DAY + 1900),
        (1.0, DAY + 1900, DAY + 3610)]
    assert cap_spent([r], DAY, DAY + 9999, 60, 1) == pytest.approx((0.3 * 60 + 1740 + 0.6 * 90 + 1710) / 3600)
    r.ended_at = DAY + 20  # ended within the billing minimum: billed to +70
    assert [(b.price_usd_h, b.start, b.end) for b in r.billings(60, 1)] == [(0.3, DAY + 10, DAY + 70)]
    assert cap_spent([r], DAY, DAY + 9999, 60, 1) == pytest.approx(0.3 * 60 / 3600)
