"""The shared domain of repurpose, pure: a trial's definition (``spec``), the FLOP math (``flops``), model shapes
(``models``), the store's layout and column names (``store``), storage URIs (``uris``; ``storage`` does the I/O)
and the one user-facing error (``errors``).

Every other package imports from here; this package imports none of them, and nothing heavy: no torch, ray,
pandas or pyarrow at import (tests/core/test_imports.py proves it in a fresh interpreter). ``storage`` is the
one module that does I/O; it takes pyarrow's filesystems when a function is called, not when it is imported.
"""
