"""The command line (`fedtext COMMAND`): the only argparse code; one module per command."""
