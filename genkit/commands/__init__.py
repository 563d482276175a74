"""One module per CLI command; each exposes a Typer-annotated function that only wires things."""
