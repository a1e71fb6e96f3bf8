from quantkit.cli.entry import main

main()
