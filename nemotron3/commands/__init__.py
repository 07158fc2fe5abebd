"""Subcommands of the `nemotron3` CLI that do not belong to one subsystem."""
