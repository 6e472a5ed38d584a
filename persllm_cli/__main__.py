from persllm_cli.cli import main

main()
