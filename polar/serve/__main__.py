import sys

from polar.serve.server import main

sys.exit(main())
