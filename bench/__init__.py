"""Benchmarks. A package only so that ``bench.gpu_e2e``'s child processes can import its modules by name."""
