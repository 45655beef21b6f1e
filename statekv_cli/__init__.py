"""The statekv command line (Typer), a thin layer over the `statekv` library."""
