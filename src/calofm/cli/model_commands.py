"""Subcommands of this concept (filled in by its owner)."""


def register(subparsers) -> None:
    pass
