"""QMP: the monitor session, guest RAM layout and migration pre-flight (the epoch gate built on it is in host_collector.rewrite)."""
