"""Our non-local block against the implementations a user would pick instead: ``python -m benchmarks.compare``
(see ``__main__.py``)."""
