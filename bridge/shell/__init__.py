"""The imperative shell: the asyncio loops that feed the core (``bridge.core``) and carry
out what it returns, through the edges (``bridge.edges``). ``app`` wires them."""
