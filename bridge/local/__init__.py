"""The local stack for development, tests, benchmarks and the demo: brokers, API simulator.

Not part of the daemon: the wheel and the image leave this package out.
"""
