"""The service's routes, one module per resource: inference (encode, decode, sample, log-likelihood), models,
and operations (health, readiness, metrics). service/app.py puts them into the app."""
