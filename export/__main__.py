import sys

from export.build_engines import main

sys.exit(main())
