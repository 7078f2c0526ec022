"""`python -m deviceplugin` is the same as the `vfio-device-plugin` console script."""

import sys

from deviceplugin.cli import main

sys.exit(main())
