"""The pieces of ``bench.py``: processes and records (``common``), speed (``speed``), accuracy (``accuracy``)."""
