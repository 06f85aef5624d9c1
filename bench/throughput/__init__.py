"""Throughput benchmark (issue 6): can one core track 10,000 concurrent tasks?

Run from the repo root, in the project's venv with the ``bench`` extra and py-spy::

    python -m bench.throughput          # ~8 minutes on a 2-core machine

It starts the first of ``--brokers`` (default ``kafka,tansu``: Apache Kafka, one KRaft
node with a 1 GB heap, then Tansu) and the WaveSpeed simulator (``bench.simserver``) on
core 1, runs every poller under test pinned to core 0 (``taskset -c 0``), and in one run
measures:

1. bare polling loops (aiohttp; httpx over httpx-aiohttp; the bridge's own ``ApiClient``;
   httpx's default transport) against the same simulator: what each HTTP stack costs;
2. sustained end to end: the real daemon (``python -m bridge run``) fed ids of tasks that
   complete on the first poll, so every poll is a consume, a GET, a produce with acks=all
   and a commit; polls/s and tasks/s, then a py-spy profile of the same load; the same on
   each other broker of ``--brokers`` (started for it, pinned to core 1 too), for the
   naive implementation (``bench.naive``), and for ``api.transport: httpx``;
3. 10,000 concurrent: a closed loop keeps ``--concurrent`` tasks of a mix of image and
   video models in flight at fixed intervals (``--intervals``); poll lateness (the
   simulator's poll time minus the time the schedule set for it), publish latency, the
   bridge's CPU share, a profile; then the naive implementation on the same load;
4. memory: RSS per in-flight task at 10,000 and 100,000 tasks in flight.

The bridge's producer is idempotent on brokers that support it (``kafka.enable_idempotence``
follows the broker's ``features.idempotence``: Apache Kafka yes, Tansu no).
``--policy adaptive`` runs the same with the adaptive policy (lateness then needs the
bridge's ``poll_lateness_seconds`` histogram).

Writes ``bench/results/throughput.md`` and ``throughput.png`` (``--no-write``: print the
markdown instead); working files (configs, logs, broker data, raw profiles,
``results.json``) go to a temporary directory named in the output. Everything it starts
is stopped by process id.

Modules: :mod:`.cli` (options, the run), :mod:`.settings`, :mod:`.stack` (simulator,
brokers, cores) and :mod:`.pollers` (bridge and naive processes), :mod:`.feeding` (model
mix, feeder), :mod:`.scenarios` (the phases), :mod:`.measurement` and :mod:`.profiles`
(what is read off a window), :mod:`.report` and :mod:`.plot` (the results).
"""
