"""The parts of ``benchmarks/multi_gpu_ring.py``: this rank's run (``ranks``), then one module a part
(``correctness``, ``scaling`` with ``context_parallel``, ``memory``), each with its markdown table."""
