"""One module per group of subcommands, each a thin shell over a public function."""
