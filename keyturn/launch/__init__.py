"""The launcher: Keyturn's composition root.

What this package is for: the ``keyturn`` command line (cli.py, and botscmd.py for
``keyturn bots``), the registrations of every protocol and surface, imported before
any config is read, and the gateways a config gives work to (installed.py), the process
runner that starts gateways, portal and bots (runner.py),
the one-command demo (demo.py, demo_seed.py) and the throwaway PostgreSQL cluster that
the demo, the tests and the benchmarks start (localpg.py). It is the only place that
imports every edge: proxies/, portal/ and bots/ next to the core.

What it must not do: be imported by the core (the rest of keyturn/) or by an edge. Both
depend on nothing above them; anything they need from a launcher is handed to them
(a ``Services``, a config, a callback). ``make lint`` checks this (the import-linter
contracts in pyproject.toml). No domain rule lives here either: commands parse arguments,
call the core or an edge, and print.
"""
