"""What each `istn` command does with the files it is given, behind the command line's parser (`istn.cli`):
one module per command."""
