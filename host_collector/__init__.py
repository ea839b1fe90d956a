"""The host side of fphint: the collector daemon, its gRPC services and the migration proxy.

Errors. Everything the collector refuses or cannot do is a ``CollectorError``
carrying the gRPC status it maps to (the class's usual one, or the one its
raise names); every service ends a call with one through
``host_collector.errors.abort``::

    CollectorError        errors.py           INTERNAL         the root
    ├── Refusal           errors.py           (each raise)     what a guest did wrong, with a metrics tag
    │   └── HintViolation hintcheck.py        (each raise)     a Report chunk no well-behaved agent sends
    ├── UnknownVm         epochs.py           NOT_FOUND        no VM of that name in the registry
    ├── EpochError        epochs.py           FAILED_PRECONDITION  no RAM layout yet, or a bad deadline
    ├── ConfigError       config.py           INVALID_ARGUMENT a configuration file refused at start
    ├── LayoutError       layout.py           FAILED_PRECONDITION  a RAM layout that is not real guest RAM
    ├── MtreeError        qmp/mtree.py        FAILED_PRECONDITION  ``info mtree`` text that is unusable
    ├── RamBlockError     qmp/ramblock.py     FAILED_PRECONDITION  a RAMBlock table that is unusable
    ├── QmpError          qmp/session.py      UNAVAILABLE      a QMP call failed or the monitor went away
    │   ├── QmpTimeout                        DEADLINE_EXCEEDED    QEMU did not answer in time
    │   └── QmpCommandError                   FAILED_PRECONDITION  QEMU answered with an error
    ├── MigrateError      migrate/run.py      (each raise)     a migration request that cannot start
    └── ProxyError        proxy/migration_proxy.py  UNAVAILABLE      the proxy could not start

Private control flow (``_SideError`` in the proxy, ``_Unknown`` and
``_NeedMore`` in the stream parser) never leaves its module.
"""
