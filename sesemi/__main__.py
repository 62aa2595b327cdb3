"""`python -m sesemi` runs the open_sesemi command."""

from sesemi.cli import main

main()
