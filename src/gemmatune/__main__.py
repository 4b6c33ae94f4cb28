import sys

from gemmatune.cli import main

sys.exit(main())
