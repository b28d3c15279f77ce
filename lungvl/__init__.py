"""The ``lungvl`` command-line interface (``lungvl.cli``); nothing else imports this package.

Importing it first checks that lungvl's other top-level packages (``server``, ``client``, ...) are
lungvl's own and not shadowed by another package of the same name (:mod:`lungvl.import_guard`).
"""

from lungvl.import_guard import exit_if_shadowed

exit_if_shadowed()
