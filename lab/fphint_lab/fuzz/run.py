"""Run one fuzz target under atheris (libFuzzer): ``python -m fphint_lab.fuzz.run TARGET [libFuzzer args] [dirs]``.

The subjects are imported under ``atheris.instrument_imports`` so libFuzzer
sees Python coverage; any exception the target lets out is a crash (saved
with ``-artifact_prefix``). Give a scratch directory first and the committed
corpus (tests/fuzz/corpus/<dir>) after it: libFuzzer writes new inputs into
the first one only. tests/test_fuzz_campaign.py and bench/fuzz.py call this.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["host_collector", "fphint"]):
    from fphint_lab.fuzz import subjects  # noqa: F401  (instrumented here, used by the targets)

from fphint_lab.fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m fphint_lab.fuzz.run {{{','.join(TARGETS)}}} [libFuzzer args]")
    target, _ = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
