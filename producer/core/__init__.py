"""The contract both sides of the queue share: routes and keys, settings, errors, the codec,
media envelopes, validation, parameters, the job store, the worker registry, dead letters
and the Celery configuration. Imports neither torch nor transformers."""
