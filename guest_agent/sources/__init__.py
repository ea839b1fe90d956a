"""Free-page sources, tried in order of preference: ebpf, kpageflags, none."""
