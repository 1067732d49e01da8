"""``python -m classifiers ...`` runs the ``lt-cls`` command line (where the console script is not on
PATH, or is a shell shim as under pyenv)."""
from cli.lt_cls_cmd import main

main()
