"""The `calofm` command line; each concept registers its subcommands from its own module."""
