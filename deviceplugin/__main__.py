"""`python -m deviceplugin` is the same as the `vfio-device-plugin` console script."""

from deviceplugin.cli import run

run()
