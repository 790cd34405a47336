"""Operating a deployment: the ``pipeq`` command, status, the Prometheus exporter, Flower
and the embedded Redis."""
