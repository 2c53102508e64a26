"""The shared domain of repurpose, pure: a trial's definition (``spec``), the FLOP math (``flops``), model shapes
(``models``), the store's layout and column names (``store``), storage URIs (``uris``), accelerators' peaks
(``devices``), the sweep strategies' knobs (``strategy``) and the one user-facing error (``errors``).

Every other package imports from here; this package imports none of them, and nothing heavy: no torch, ray,
pandas or pyarrow (tests/core/test_imports.py proves it in a fresh interpreter). I/O on storage URIs is the
``fsio`` package's, beside this one.
"""
