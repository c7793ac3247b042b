"""One module per CLI subcommand; see ``stepdistill.cli``."""
