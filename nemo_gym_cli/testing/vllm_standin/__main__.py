from nemo_gym_cli.testing.vllm_standin.cli import main

main()
