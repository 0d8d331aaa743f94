from nemo_gym_cli.testing.vllm_standin.main import main

main()
