"""clawq's HTTP layer (``clawq serve``, the ``clawq[server]`` extra).

- :mod:`server.app`: the FastAPI application (:func:`server.app.create_app`) and :func:`server.app.serve`;
- :mod:`server.auth`: the optional bearer-token check;
- :mod:`server.metrics`: the Prometheus collector of ``GET /metrics`` and the claim-to-start histogram
  writer the workers call (importable without the extra installed).

Nothing is imported here, so ``import server.metrics`` needs neither FastAPI nor prometheus-client.
"""
