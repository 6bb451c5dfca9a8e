"""Settings -> batch formation: the policy the scheduler builds (no engine, no broker needed)."""

from __future__ import annotations

from stream_sentiment.batching.batcher import Formation
from stream_sentiment.batching.cost import BACKEND_COSTS, PACKED_TOKEN_COST, CallCost
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


def test_the_packed_forward_makes_padding_nearly_free_unless_a_token_cost_is_set():
    packed = {"backend": "engine-server", "server_socket": "/tmp/engine.sock", "torch_forward": "packed"}
    policy = batching_policy(Settings.load(engine=packed, batching={"formation": "least-cost"}), (16, 32, 64, 256))
    assert policy.cost == CallCost(call=BACKEND_COSTS["engine-server"].call, token=PACKED_TOKEN_COST)
    assert PACKED_TOKEN_COST < BACKEND_COSTS["engine-server"].token / 10
    tuned = batching_policy(Settings.load(engine=packed, batching={"token_cost_ns": 80}), (16, 32, 64, 256))
    assert tuned.cost.token == 80e-9
    # ONNX Runtime has no packed forward: the setting changes nothing there.
    cpu = batching_policy(Settings.load(engine={"torch_forward": "packed"}), (16, 32, 64, 256))
    assert cpu.cost == BACKEND_COSTS["onnxruntime"]


def test_arrival_formation_is_a_settings_value_for_the_dynamic_padding_baseline():
    every_8 = tuple(range(8, 257, 8))
    policy = batching_policy(Settings.load(batching={"formation": "arrival", "buckets": every_8}), every_8)
    assert policy.formation is Formation.ARRIVAL and policy.buckets == every_8
