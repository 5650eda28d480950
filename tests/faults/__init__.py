"""The fault suite: the example proxy under real uvicorn processes, against databases that fail.

Marked ``fault`` and left out of the default run; ``python -m pytest -m fault`` runs it (about four
minutes on a 2-core machine) and prints a table, one line per scenario:
``scenario | sent | client failures | rows stored | journal records | lost | result``.

What it needs, found at run time:

- PostgreSQL server binaries (``pg_config --bindir``, ``/usr/lib/postgresql/*/bin`` or ``initdb`` on
  PATH) for a throwaway cluster of its own on a free port; as root they run as the ``postgres`` user.
  The machine's own PostgreSQL is never touched.
- Root (or CAP_SYS_ADMIN) to mount a small tmpfs for the disk-full scenario; skipped otherwise.
- As root, ``setpriv`` (util-linux) for the permission scenarios, which run the proxy without root's
  permission override.

Without PostgreSQL binaries the PostgreSQL scenarios are skipped, with the reason; with ``CI`` set they
fail instead, so CI cannot pass on a suite that silently shrank: ``CI=1 python -m pytest -m fault``.
"""
