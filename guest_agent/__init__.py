"""The guest side of fphint: the agent that reports free pages to the collector.

Errors. Everything the agent cannot do here is an ``AgentError`` whose
message says why (for the logs and the attach facts); a source that fails
becomes ``SourceUnavailable`` and the agent falls back to the next one::

    AgentError            errors.py                   the root
    ├── DiscoveryError    discovery.py                a setting whose place cannot be read or parsed
    ├── SourceUnavailable sources/base.py             a source cannot run on this kernel
    ├── BtfError          sources/ebpf/btf.py         malformed BTF, or a needed type is missing
    ├── PageLayoutError   sources/ebpf/layout.py      BTF lacks what the scanner needs of struct page
    ├── HeadersMissing    sources/ebpf/headers.py     no kernel headers for bcc
    ├── LoaderError       sources/ebpf/loader.py      the loader child died, timed out or sent junk
    ├── LoadError         sources/ebpf/program.py     the program could not be compiled or loaded
    │   └── ProgramRefused                            the kernel's verifier refused it
    └── VmemmapError      sources/ebpf/vmemmap.py     vmemmap_base not found, or not struct pages
"""
