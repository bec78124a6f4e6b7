"""The GAP-REPLAY curation writes the same bytes on every Beam runner (issue 13.5).

One DirectRunner run in this process is the reference; the same input then runs on Beam's multi-process
direct mode (2 worker processes) and on the Dask runner over a local ``dask.distributed`` cluster of
2 worker processes. Every output file (shards, removed.jsonl, malformed.jsonl, stats.json, manifest.json)
must be byte-identical; stats.json differs only in the output folder it records.

Input: the real sample (capped per file, read in place) plus a planted replay file whose exact copy, near
copy, bad line, short and French records and a benchmark-contaminated record make every output file
non-empty. The contamination index is a small hand-made one (it still travels to the workers as a file, as
on a cluster).

That the two runs really ran outside this process is shown by breaking the language filter here
(``pipeline.english_score`` raises in this process only): workers import the module afresh.
"""

import json
import pathlib

import pytest

from meditron_jax.data.curation import SOURCES, pipeline
from meditron_jax.data.curation.contamination import ContaminationIndex
from meditron_jax.data.curation.pipeline import CurationConfig, CurationError, beam_args, check_runner_paths, run
from meditron_jax.data.paths import shared_path

# Each pipeline run below is marked slow: it loads the tokenizer, and the cluster runs start worker processes
# that load it again (15-110 s each on 2 shared cores).
CAP = 6  # documents per input file: every source present, a run in seconds of work
CONTAMINATION_REF = "which of the following drugs is the first line treatment for acute angle closure glaucoma"


def _plant(shared_data: pathlib.Path, base: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """The sample folder as it is, and one planted replay JSONL file outside it (an absolute pattern)."""
    inp = shared_data / "gap_replay_sample"
    play = (inp / "replay_general" / "input.txt").read_text()
    text = play[:3000]
    words = text.split(" ")
    near = " ".join("zebra" if i == 40 else w for i, w in enumerate(words))  # one word of ~500 changed
    records = [
        {"id": "planted-a-original", "text": text},
        {"id": "planted-b-exact-copy", "text": text},
        {"id": "planted-c-near-copy", "text": near},
        {"id": "planted-short", "text": "Too short"},
        {"id": "planted-french", "text": "Le patient est arrivé à l'hôpital avec une douleur " * 20},
        {"id": "planted-exam", "text": play[3000:4000] + " " + CONTAMINATION_REF + ". " + play[4000:5000]},
    ]
    planted = base / "planted" / "extra.jsonl"
    planted.parent.mkdir()
    lines = [json.dumps(r) for r in records]
    lines.insert(3, '{"id": "planted-bad", "text": ')  # malformed: reported with its line
    planted.write_text("\n".join(lines) + "\n")
    return inp, planted


def _config(inp: pathlib.Path, planted: pathlib.Path, out: pathlib.Path) -> CurationConfig:
    config = CurationConfig(
        input_dir=str(inp),
        output_dir=str(out),
        num_shards=3,
        max_docs_per_file=CAP,
        tokenizer_model=str(shared_path("llama2_tokenizer", "tokenizer.model")),
    )
    config.patterns["replay"] = (*config.patterns["replay"], str(planted))
    return config


def _index() -> ContaminationIndex:
    return ContaminationIndex.build([("medqa:test:1", CONTAMINATION_REF)])


def _files(out: pathlib.Path) -> dict[str, bytes]:
    """Every output file; the marker of the atomic folder (a timestamp) is not the pipeline's output."""
    found = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.name != ".meditron_jax_output.json":
            data = path.read_bytes()
            if path.name == "stats.json":
                data = data.replace(json.dumps(str(out)).encode(), b'"OUT"')
            found[str(path.relative_to(out))] = data
    return found


@pytest.fixture(scope="module")
def planted(shared_data, tmp_path_factory):
    return _plant(shared_data, tmp_path_factory.mktemp("runners"))


@pytest.fixture(scope="module")
def reference(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("direct") / "out"
    stats = run(_config(*planted, out), ["--runner=DirectRunner"], _index())
    return out, stats


@pytest.mark.slow
def test_reference_output_exercises_every_file(reference):
    """The comparison below means something only if every file has content and every filter fired."""
    out, stats = reference
    files = _files(out)
    assert all(files[f] for f in ("removed.jsonl", "malformed.jsonl", "stats.json", "manifest.json"))
    removed = {json.loads(x)["id"]: json.loads(x)["filter"] for x in (out / "removed.jsonl").read_text().splitlines()}
    assert removed["replay:planted-b-exact-copy"] == "exact_duplicate"
    assert removed["replay:planted-c-near-copy"] == "near_duplicate"
    assert removed["replay:planted-short"] == "too_short"
    assert removed["replay:planted-french"] == "non_english"
    assert removed["replay:planted-exam"] == "contaminated"
    malformed = [json.loads(x) for x in (out / "malformed.jsonl").read_text().splitlines()]
    assert [(m["file"].endswith("extra.jsonl"), m["position"]) for m in malformed] == [(True, {"line": 4})]
    for src in SOURCES:
        assert stats["sources"][src]["output"]["train"]["docs"] > 0, src
        assert stats["sources"][src]["output"]["train"]["tokens"] > 0, src
    manifest = json.loads(files["manifest.json"])
    assert manifest["shards"]["replay"]["train"]["files"] == [f"replay/train-0000{i}-of-00003.jsonl" for i in range(3)]
    lines = sum(len((out / f).read_text().splitlines()) for f in manifest["shards"]["replay"]["train"]["files"])
    assert (
        lines == manifest["shards"]["replay"]["train"]["docs"] == stats["sources"]["replay"]["output"]["train"]["docs"]
    )


def _same_as_reference(reference, planted, out, args, monkeypatch):
    def not_here(text):
        raise AssertionError("the language filter ran in the test process, not in a worker")

    monkeypatch.setattr(pipeline, "english_score", not_here)
    stats = run(_config(*planted, out), args, _index())
    ref_out, ref_stats = reference
    want, got = _files(ref_out), _files(out)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs from DirectRunner's"
    assert {k: v for k, v in stats.items() if k != "config"} == {k: v for k, v in ref_stats.items() if k != "config"}


@pytest.mark.slow
def test_direct_runner_in_process_is_what_the_probe_catches(planted, tmp_path, monkeypatch):
    """The probe of the two tests below: in this process the broken filter fails the run."""
    monkeypatch.setattr(pipeline, "english_score", lambda text: 1 / 0)
    with pytest.raises(CurationError, match="ZeroDivisionError"):
        run(_config(*planted, tmp_path / "out"), ["--runner=DirectRunner"], _index())


@pytest.mark.slow
def test_multi_process_direct_runner_writes_the_same_bytes(reference, planted, tmp_path, monkeypatch):
    args = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    _same_as_reference(reference, planted, tmp_path / "out", args, monkeypatch)


@pytest.mark.slow
def test_dask_runner_on_a_local_cluster_writes_the_same_bytes(reference, planted, tmp_path, monkeypatch):
    import distributed  # the 'dask' extra, which scripts/setup_env.sh installs: CI runs this test

    monkeypatch.setenv("DASK_LOGGING__DISTRIBUTED", "warning")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        args = ["--runner=DaskRunner", f"--dask_client_address={cluster.scheduler_address}"]
        _same_as_reference(reference, planted, tmp_path / "out", args, monkeypatch)


@pytest.mark.slow
def test_runner_names_and_missing_writes(planted, tmp_path, monkeypatch):
    assert beam_args(None) == ["--runner=DirectRunner"]
    assert beam_args(["--direct_num_workers=2"]) == ["--runner=DirectRunner", "--direct_num_workers=2"]
    assert beam_args(["--runner", "DaskRunner"])[1] == "apache_beam.runners.dask.dask_runner.DaskRunner"
    # A runner that reports success without writing a shard is caught, not turned into a short corpus.
    inp, extra = planted
    config = CurationConfig(
        input_dir=str(inp),
        output_dir=str(tmp_path / "out"),
        patterns={"replay": (str(extra),)},
        contamination_refs=(),
    )
    real = pipeline.WriteFiles.process

    def skip_one(self, item):
        if item[0] == "replay/train-00001-of-00004.jsonl":
            return iter([item[0]])
        return real(self, item)

    monkeypatch.setattr(pipeline.WriteFiles, "process", skip_one)
    with pytest.raises(CurationError, match="without writing 1 output files, e.g. replay/train-00001-of-00004.jsonl"):
        run(config, ["--runner=DirectRunner"])
    assert not (tmp_path / "out").exists()


def test_cli_passes_runner_and_beam_options_through(shared_data, tmp_path, monkeypatch):
    from meditron_jax.cli import prepare_data

    seen = {}

    def fake_run(config, pipeline_args, overwrite):
        seen["args"] = pipeline_args
        return {"sources": {}}

    monkeypatch.setattr(prepare_data, "run", fake_run)
    argv = ["--input_dir", str(shared_data / "gap_replay_sample"), "--output_dir", str(tmp_path / "out")]
    argv += ["--tokenizer_model", "none", "--runner", "DaskRunner", "--dask_client_address=tcp://h:1"]
    assert prepare_data.main([*argv, "--beam_options", "--dask_npartitions=2 --job_name='a b'"]) == 0
    assert seen["args"] == [
        "--runner=apache_beam.runners.dask.dask_runner.DaskRunner",
        "--dask_npartitions=2",
        "--job_name=a b",
        "--dask_client_address=tcp://h:1",
    ]


def test_a_remote_runner_refuses_local_paths_before_launching(shared_data, tmp_path):
    local_in, out = str(shared_data / "gap_replay_sample"), tmp_path / "out"
    config = CurationConfig(input_dir=local_in, output_dir=str(out), contamination_refs=())
    with pytest.raises(ValueError, match=f"--input_dir {local_in} is a local path, which DataflowRunner's workers"):
        run(config, ["--runner=DataflowRunner", "--project=p"])
    assert not out.exists()
    check_runner_paths(config, ["--runner", "DirectRunner"])  # one machine: local paths are fine
    remote = CurationConfig(input_dir="gs://b/raw", output_dir="gs://b/out", tokenizer_model="/home/me/tok.model")
    with pytest.raises(ValueError, match="--tokenizer_model /home/me/tok.model is a local path"):
        check_runner_paths(remote, ["--runner=DataflowRunner"])
    remote.tokenizer_model = "gs://b/tok.model"
    remote.patterns["replay"] = ("/data/extra.jsonl",)
    with pytest.raises(ValueError, match="--replay_glob /data/extra.jsonl is a local path"):
        check_runner_paths(remote, ["--runner=DataflowRunner"])
    remote.patterns["replay"] = ("replay/*.jsonl",)  # relative to the gs:// input folder
    check_runner_paths(remote, ["--runner=DataflowRunner"])
