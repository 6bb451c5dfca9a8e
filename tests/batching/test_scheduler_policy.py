"""Settings -> batch formation: the policy the scheduler builds (no engine, no broker needed)."""

from __future__ import annotations

from stream_sentiment.batching.batcher import Formation
from stream_sentiment.batching.cost import BACKEND_COSTS, CallCost
from stream_sentiment.batching.scheduler import batching_policy
from stream_sentiment.config import Settings


def test_default_settings_keep_todays_bucket_formation():
    policy = batching_policy(Settings.load(), (32, 64, 128, 256))
    assert policy.formation is Formation.BUCKETS and policy.cost == BACKEND_COSTS["onnxruntime"]


def test_least_cost_takes_the_backend_defaults_unless_costs_are_set():
    gpu = {"backend": "engine-server", "server_socket": "/tmp/engine.sock"}
    policy = batching_policy(Settings.load(engine=gpu, batching={"formation": "least-cost", "timeout_ms": 0}),
                             (16, 32, 64, 256))
    assert (policy.formation, policy.timeout) == (Formation.LEAST_COST, 0.0)
    assert policy.cost == BACKEND_COSTS["engine-server"]
    tuned = batching_policy(Settings.load(engine=gpu, batching={"formation": "least-cost", "call_cost_us": 400,
                                                                  "token_cost_ns": 80}), (16, 32, 64, 256))
    assert tuned.cost == CallCost(call=400e-6, token=80e-9)


def test_arrival_formation_is_a_settings_value_for_the_dynamic_padding_baseline():
    every_8 = tuple(range(8, 257, 8))
    policy = batching_policy(Settings.load(batching={"formation": "arrival", "buckets": every_8}), every_8)
    assert policy.formation is Formation.ARRIVAL and policy.buckets == every_8
