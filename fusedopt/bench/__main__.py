import sys

from fusedopt.bench import main

sys.exit(main())
