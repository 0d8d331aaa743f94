"""Test and bench support that ships with the package: the local vLLM stand-in (vllm_standin/)
and the harness that tests, benches and each environment's tests/ share (harness/)."""
