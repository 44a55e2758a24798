"""``python -m flatcli``."""

from flatcli.cli import main

main()
