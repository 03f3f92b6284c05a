"""`python -m octssl ...` runs the command line (same as the `octssl` script)."""

from octssl.cli import main

main()
