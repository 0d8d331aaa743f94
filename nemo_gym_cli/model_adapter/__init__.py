"""The model-adapter framework: a server over OpenAI-compatible upstreams (vLLM, OpenAI) that
routes through routing/'s Router. Plug-ins import it from `nemo_gym_cli.serving`."""
