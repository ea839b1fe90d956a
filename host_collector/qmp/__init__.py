"""QMP: guest RAM layout, migration pre-flight, and the epoch gate (MIGRATION_PASS + query-migrate)."""
