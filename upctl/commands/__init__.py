"""Typer subcommands, one module each."""
