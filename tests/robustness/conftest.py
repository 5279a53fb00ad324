"""The robustness tests' helpers live in robust_helpers.py (a unique module name: several conftest.py exist)."""
