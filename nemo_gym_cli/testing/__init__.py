"""Test and bench support that ships with the package: the local vLLM stand-in."""
