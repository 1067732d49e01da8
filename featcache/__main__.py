"""``python -m featcache ...`` runs the ``featcache`` command line, e.g. under torchrun, which needs a
Python module rather than a console script: ``torchrun --nproc_per_node=4 -m featcache extract ...``."""
from cli.featcache_cmd import main

main()
