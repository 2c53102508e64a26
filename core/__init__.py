"""The shared domain of repurpose, pure: a trial's definition (``spec``), the fine-tuning methods, one record each
(``methods``), the FLOP math (``flops``), memory estimates (``memory``), model shapes (``models``), the worker's
event to the driver (``events``), content keys (``hashing``), the lr schedule (``schedule``), the store's layout and
column names (``store``), storage URIs (``uris``), accelerators' peaks (``devices``), the sweep strategies' knobs
(``strategy``) and the one user-facing error with its one-line form (``errors``).

Every other package imports from here; this package imports none of them, and nothing heavy: no torch, ray,
pandas or pyarrow (tests/core/test_imports.py proves it in a fresh interpreter). I/O on storage URIs is the
``fsio`` package's, beside this one.
"""
