from agentflow_cli.main import main

main()
