"""The `quantkit` command line (Typer): one module per command; commands parse, call the library, print."""
