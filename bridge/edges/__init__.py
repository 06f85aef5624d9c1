"""The I/O edges, thin: Kafka clients, the HTTP client of the result API, the metrics
registry and server, the webhook receiver and the log pipeline. They move bytes; what the
bytes mean is decided in ``bridge.core``."""
