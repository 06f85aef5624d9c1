"""The pure core: every decision the daemon makes, as plain code driven with ``now``.

Nothing in this package does I/O or imports an I/O library (asyncio, aiokafka, aiohttp,
httpx, prometheus_client, structlog, logging, socket): ``tests/test_layout.py`` keeps it so.
The shell (``bridge.shell``) runs the loops around it; the edges (``bridge.edges``) move
the bytes.
"""
