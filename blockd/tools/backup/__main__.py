import sys

from blockd.tools.backup.cli import main

sys.exit(main())
