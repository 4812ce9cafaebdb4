import sys

from funceng.cli import main

sys.exit(main())
