"""Hugging Face hub ids wherever a model folder goes, read offline from a hub cache laid out as huggingface_hub
writes it (models--OWNER--NAME/snapshots/COMMIT + refs/main), populated from the shared data. Nothing may
reach the network: HF_HUB_OFFLINE=1 and the hub client's listing calls fail the test if reached."""

import importlib
import json
import shutil

import numpy as np
import pytest

from meditron_jax.convert import hub

REPO = "meditron-test/stories260K"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate(cache, repo_id, source, commit=COMMIT):
    """Copy ``source`` into ``cache`` as the snapshot of ``repo_id`` at ``commit`` (also refs/main)."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, root / "snapshots" / commit)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


@pytest.fixture
def hub_cache(tmp_path, shared_data, monkeypatch):
    import huggingface_hub

    cache = tmp_path / "hf_cache"
    populate(cache, REPO, shared_data / "stories260K_hf")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was contacted in a test")

    for name in ("list_repo_files", "repo_info", "list_repo_tree", "create_repo", "upload_folder"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, no_network)
    hub._resolved.clear()
    yield cache
    hub._resolved.clear()


def test_hub_id_shapes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.parse_hub_id("epfl-llm/meditron-7b") == ("epfl-llm/meditron-7b", None)
    assert hub.parse_hub_id("epfl-llm/meditron-7b@v1.0") == ("epfl-llm/meditron-7b", "v1.0")
    not_ids = ("meditron-7b", "a/b/c", "./a/b", "../a/b", "/a/b", "~/a/b", "a/../b", "a/b@", "/", "a/", "gs://b/run")
    for not_an_id in not_ids:
        assert hub.parse_hub_id(not_an_id) is None, not_an_id
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    assert hub.parse_hub_id("runs/quickstart") is None  # an existing folder always wins
    assert hub.resolve_model_path("runs/quickstart") == "runs/quickstart"


def test_load_a_hub_id_offline_from_the_cache(hub_cache, shared_data):
    import meditron_jax

    by_id = meditron_jax.load(REPO)
    by_dir = meditron_jax.load(shared_data / "stories260K_hf")
    assert by_id.config == by_dir.config
    for a, b in zip(_leaves(by_id.params), _leaves(by_dir.params), strict=True):
        assert np.array_equal(a, b)
    assert by_id.tokenizer is not None and by_id.tokenizer.vocab_size == by_dir.tokenizer.vocab_size
    # A pinned commit reads the same snapshot; the tokenizer may come from a hub id too.
    pinned = hub.resolve_model_path(f"{REPO}@{COMMIT}")
    assert pinned == hub.resolve_model_path(REPO) and pinned.endswith(COMMIT)
    assert meditron_jax.load(shared_data / "stories260K_hf", tokenizer_path=REPO).tokenizer is not None


def test_an_id_missing_from_the_cache_offline_says_how_to_fetch_it(hub_cache):
    import meditron_jax

    with pytest.raises(FileNotFoundError) as e:
        meditron_jax.load("epfl-llm/meditron-7b")
    msg = str(e.value)
    assert "epfl-llm/meditron-7b is not a directory" in msg and str(hub_cache) in msg
    assert "HF_HUB_OFFLINE" in msg and "hf download epfl-llm/meditron-7b" in msg
    with pytest.raises(FileNotFoundError, match="@v9"):
        hub.resolve_model_path(f"{REPO}@v9")


def test_cli_checkpoint_flags_and_init_from_take_hub_ids(hub_cache, tmp_path, capsys):
    from meditron_jax.cli import convert, generate
    from meditron_jax.convert.orbax import load_orbax
    from meditron_jax.train.trainer import TrainConfig, _initial_params, model_config

    assert generate.main(["--model_dir", REPO, "--prompt", "Lily", "--max_new_tokens", "8"]) == 0
    assert "=== 'Lily'" in capsys.readouterr().out
    out = tmp_path / "orbax"
    assert convert.main(["--to", "orbax", "--input", REPO, "--output", str(out)]) == 0
    params, cfg = load_orbax(str(out))
    cfg_train = TrainConfig(model_dir=str(tmp_path / "run"), init_from=REPO)
    assert model_config(cfg_train).hidden_size == cfg.hidden_size
    for a, b in zip(_leaves(_initial_params(cfg_train, model_config(cfg_train))), _leaves(params), strict=True):
        assert np.array_equal(a, b)
    assert convert.console(["--to", "orbax", "--input", "nobody/nothing", "--output", str(tmp_path / "x")]) == 1
    assert "nobody/nothing is not a directory" in capsys.readouterr().err


def test_eval_records_the_hub_id(hub_cache, tmp_path):
    from meditron_jax.eval import cli as eval_cli

    out = tmp_path / "eval"
    eval_cli.main(
        ["--checkpoint", REPO, "--benchmark", "pubmedqa", "--strategy", "loglik", "--limit", "2", "--output", str(out)]
    )
    assert json.loads((out / "results.json").read_text())["config"]["checkpoint"] == REPO


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture
def online(tmp_path, monkeypatch):
    """The hub as seen online, with huggingface_hub's two calls replaced by recorders (nothing is sent)."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(importlib.import_module("huggingface_hub.constants"), "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    state = {"files": [], "error": None, "calls": []}

    def list_repo_files(self, repo_id, revision=None, **kw):
        if state["error"] is not None:
            raise state["error"]
        return state["files"]

    def snapshot_download(repo_id, **kw):
        from huggingface_hub.errors import LocalEntryNotFoundError

        if kw.get("local_files_only"):
            raise LocalEntryNotFoundError("not in the cache")  # the cache is empty here
        state["calls"].append((repo_id, kw))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    hub._resolved.clear()
    yield state
    hub._resolved.clear()


def test_online_download_takes_one_copy_of_the_weights(online, tmp_path):
    online["files"] = ["config.json", "model-00001-of-00002.safetensors", "pytorch_model-00001-of-00002.bin"]
    online["files"] += ["original/consolidated.00.pth", "tokenizer.model", "model.safetensors.index.json"]
    assert hub.resolve_model_path("epfl-llm/meditron-7b@main") == str(tmp_path / "snapshot")
    ((repo, kw),) = online["calls"]
    assert repo == "epfl-llm/meditron-7b" and kw["revision"] == "main" and kw["cache_dir"] == str(tmp_path / "hf_cache")
    assert sorted(kw["allow_patterns"]) == sorted(["*.json", "tokenizer.model", "*.safetensors"])
    hub.resolve_model_path("epfl-llm/meditron-7b@main")  # asked again in this process: no second look-up
    assert len(online["calls"]) == 1
    online["files"] = ["config.json", "pytorch_model.bin", "tokenizer.model"]
    hub.resolve_model_path("someone/bin-only")
    assert "*.bin" in online["calls"][-1][1]["allow_patterns"]


def test_online_errors_name_the_repository(online):
    import httpx2
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/a/b"))
    online["error"] = RepositoryNotFoundError("404", response=response)
    with pytest.raises(FileNotFoundError, match="runs/typo is not a directory, nor a model on the Hugging Face hub"):
        hub.resolve_model_path("runs/typo")  # a mistyped local folder reads as an id: both are said
    online["error"] = GatedRepoError("403", response=response)
    with pytest.raises(PermissionError, match="meta-llama/Llama-2-7b-hf is gated.*accept its license"):
        hub.resolve_model_path("meta-llama/Llama-2-7b-hf")
    # No connection and nothing cached: the error says both and how to fetch it.
    online["error"] = httpx2.ConnectError("no route to host")
    with pytest.raises(FileNotFoundError, match="could not be reached.*ConnectError.*hf download owner/name"):
        hub.resolve_model_path("owner/name")
