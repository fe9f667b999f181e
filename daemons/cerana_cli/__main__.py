import sys

from cerana_cli.cli import main

sys.exit(main())
