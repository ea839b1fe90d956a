"""The standing fuzz campaign (fphint_lab.fuzz, corpus in tests/fuzz/corpus): the committed corpus replayed
through every target, a short coverage-guided run of each under atheris,
and proof that the checkers catch a planted fault. bench/fuzz.py runs the
same targets for long."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fphint_lab.fuzz import targets
from fphint_lab.fuzz.campaign import CORPUS, campaign
from fphint_lab.fuzz.targets import TARGETS
from fphint_lab.stream_reference import reference_read

#: Per target, for the run inside `make test`: seconds, and at most this many inputs.
SHORT_S = 3
SHORT_RUNS = 20000


def corpus(directory: str) -> list[Path]:
    return sorted(p for p in (CORPUS / directory).iterdir() if p.is_file())


def test_the_corpus_is_small_and_real() -> None:
    files = [p for d in ("stream", "mtree", "ranges") for p in corpus(d)]
    assert sum(p.stat().st_size for p in files) < 400 << 10
    names = {p.name for p in files}
    assert {"qemu72-pc.bin", "qemu10-pc.bin", "qemu72-pc-D.txt", "qemu10-q35-D.txt"} <= names


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_corpus_replays_clean(name: str) -> None:
    fn, directory = TARGETS[name]
    seeds = corpus(directory)
    assert seeds
    for p in seeds:
        fn(p.read_bytes())


def run_campaign(name: str, seconds: float, runs: int, work: Path) -> dict[str, Any]:
    """:func:`campaign`, failing on a crash or any other exit but 0."""
    stats = campaign(name, seconds, runs, work)
    if stats["returncode"] != 0 or stats["crashes"]:
        raise AssertionError(f"fuzz target {name} failed (exit {stats['returncode']}):\n{stats['tail']}")
    return stats


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_a_short_campaign_finds_nothing(name: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    stats = run_campaign(name, SHORT_S, SHORT_RUNS, tmp_path)
    assert stats["number_of_executed_units"] > 0 and stats["coverage"] > 0


def test_the_rewriter_checker_catches_a_wrong_rewrite(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gate that frees pages the checker does not expect: the checker must say so."""
    monkeypatch.setattr(targets._ThirdGate, "is_free", lambda self, block, page: True)
    failures = 0
    for p in corpus("stream"):
        try:
            targets.rewriter(p.read_bytes())
        except AssertionError as e:
            assert "without a hint" in str(e)
            failures += 1
    assert failures


def test_the_stream_checker_catches_a_parser_that_takes_too_much(monkeypatch: pytest.MonkeyPatch) -> None:
    """A parser that accepts page offsets beyond its block: the reference disagrees."""
    from fphint_lab.fuzz import subjects

    seed = corpus("stream")[0].read_bytes()
    data = bytearray(seed)
    ref = reference_read(bytes(data))
    a = ref.pages[0][0]
    data[a : a + 8] = ((1 << 40) | (data[a + 7])).to_bytes(8, "big")  # offset 1 TiB: beyond any block
    targets.stream(bytes(data))  # the real parser agrees with the reference
    orig = subjects.StreamParser._bad_offset
    monkeypatch.setattr(subjects.StreamParser, "_ram_records", _lenient(subjects.StreamParser._ram_records))
    with pytest.raises(AssertionError):
        targets.stream(bytes(data))
    assert orig is subjects.StreamParser._bad_offset


def _lenient(records: Callable[..., Any]) -> Callable[..., Any]:
    """_ram_records with every block made huge (so out-of-range offsets pass)."""

    def patched(self: Any, buf: Any, pos: int, end: int) -> Any:
        self._block_len = 1 << 62
        self.blocks = {k: 1 << 62 for k in self.blocks}
        return records(self, buf, pos, end)

    return patched
