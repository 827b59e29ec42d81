"""The HTTP endpoint: provider status pushes, health checks and Prometheus metrics."""
