"""cdcddp: a realtime DDP server that makes PostgreSQL a Meteor backend.

Layers (see DESIGN.md): ``wal`` (replication stream), ``ddp`` (sans-IO protocol),
``publish`` (publications and observers), ``methods`` (methods and accounts),
``server`` (trio wiring).
"""

__version__ = "0.1.0"
