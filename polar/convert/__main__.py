import sys

from polar.convert import main

sys.exit(main())
