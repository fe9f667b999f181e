import sys

from cerana_bootserver.cli import main

sys.exit(main())
