"""The fixtures (`standins`, `graph`, `mode`) live in nemo_gym_cli/testing/harness/fixtures.py,
loaded for every test folder by pyproject's addopts; helpers come from nemo_gym_cli.testing.harness.
"""
