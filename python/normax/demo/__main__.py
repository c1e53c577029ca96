"""``python -m normax.demo``: see :mod:`normax.demo`."""

from normax.demo import main

main()
