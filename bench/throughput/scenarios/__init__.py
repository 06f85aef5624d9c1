"""The phases of a run, one module each, every one a coroutine on a started
:class:`~bench.throughput.stack.Stack` that returns what it measured:

- :mod:`.ceilings`: bare polling loops, what each HTTP stack costs;
- :mod:`.sustained`: the daemon (then the naive poller) with every poll completing its
  task, on any broker;
- :mod:`.concurrent`: 10,000 tasks of a realistic mix kept in flight; poll lateness;
- :mod:`.memory`: RSS per in-flight task.
"""
