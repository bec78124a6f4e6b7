"""The curation's external sort (``curation/extsort.py``) against Python's ``sorted``."""

import random

import pytest

from meditron_jax.data.curation import extsort


@pytest.mark.parametrize("n, run_size", [(0, 3), (1, 3), (5, 5), (6, 5), (1000, 7), (1000, 5000)])
def test_external_sort_equals_sorted(n, run_size, tmp_path):
    rng = random.Random(n * 31 + run_size)
    rows = [((rng.randrange(50), f"id{rng.randrange(300)}"), f'{{"text": "{rng.random()}"}}') for _ in range(n)]
    got = list(extsort.external_sorted(iter(rows), run_size=run_size, tmpdir=str(tmp_path)))
    assert got == sorted(rows)


def test_external_sort_spills_runs_and_cleans_up(tmp_path, monkeypatch):
    spilled = []
    real = extsort._dump_run

    def counting(rows, tmpdir):
        assert len(rows) <= 10  # never more than one run in memory
        spilled.append(len(rows))
        return real(rows, tmpdir)

    monkeypatch.setattr(extsort, "_dump_run", counting)
    rows = [(i * 7919 % 101, str(i)) for i in range(101)]
    assert list(extsort.external_sorted(rows, run_size=10, tmpdir=str(tmp_path))) == sorted(rows)
    assert spilled == [10] * 10  # the last row stays in memory
    assert list(tmp_path.iterdir()) == []  # unnamed temporary files, gone once read


def test_external_sort_rejects_an_empty_run():
    with pytest.raises(ValueError, match="run_size 0"):
        list(extsort.external_sorted([1], run_size=0))
