"""Commands print what the user needs: TensorFlow/absl/SeqIO/Beam start-up noise is hidden unless --verbose.
The noise strings below are written out by hand from what these libraries print (captured from
`bash scripts/quickstart.sh` before the fix), not taken from the code under test."""

import os
import subprocess
import sys

import pytest

NOISE = (
    "All log messages before absl::InitializeLog() is called",  # absl, before TF initialises it
    "oneDNN custom operations are on",  # TF port.cc
    "Could not find cuda drivers on your machine",  # TF cudart_stub.cc
    "This TensorFlow binary is optimized to use available CPU instructions",  # TF cpu_feature_guard.cc
    "T5 library uses PAD_ID=0",  # seqio, per SentencePiece vocabulary
    "Using an uncached FunctionDataset for training",  # seqio, per in-memory task
    "precompiled_charsmap is empty",  # SentencePiece inside tensorflow-text
    "apitools not found",  # Apache Beam import
    "google.cloud.bigquery_storage_v1",  # Apache Beam import
    "Sharding info not provided when restoring",  # orbax UserWarning
)
FILTER = os.path.join(os.path.dirname(__file__), "..", "meditron_jax", "cli", "stderr_filter.py")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "MEDITRON_STDERR_FILTERED")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")  # as a user runs it: one CPU device, TF's own log level
    return env


def _noise_in(text):
    return [n for n in NOISE if n in text]


@pytest.mark.slow  # two cold starts of jax: ~8 s each
def test_generate_is_quiet_and_verbose_brings_the_library_logs_back(shared_data):
    cmd = [sys.executable, "-m", "meditron_jax.cli.generate", "--model_dir", str(shared_data / "stories260K_hf")]
    cmd += ["--max_new_tokens", "4"]
    quiet = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stdout.startswith("=== 'Once upon a time'\nOnce upon a time")
    assert _noise_in(quiet.stderr) == [], quiet.stderr
    assert quiet.stderr.strip() == "", quiet.stderr  # nothing else either: generate has nothing to warn about
    loud = subprocess.run([*cmd, "--verbose"], env=_env(), capture_output=True, text=True, timeout=600)
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "DEBUG Initializing backend 'cpu'" in loud.stderr  # jax's own log, hidden without --verbose
    # TensorFlow prints this when imported with its default log level: generation never imports it.
    assert "Could not find cuda drivers on your machine" not in loud.stderr
    assert loud.stdout == quiet.stdout


def test_python_logged_noise_is_dropped_and_the_rest_kept():
    code = (
        "from meditron_jax.cli.common import quiet_startup\n"
        "quiet_startup(False)\n"
        "import logging, warnings\n"
        "logging.getLogger('apache_beam.io.gcp.bigquery').warning("
        "'apitools not found, and bigquery client libraries are not available despite the import')\n"
        "logging.getLogger('apache_beam.io.gcp.bigquery').info("
        "'No module named google.cloud.bigquery_storage_v1. As a result, ...')\n"
        "logging.getLogger('absl').warning('T5 library uses PAD_ID=0, which is different from the sentencepiece')\n"
        "logging.getLogger('absl').warning('Using an uncached FunctionDataset for training is not recommended')\n"
        "warnings.warn('Sharding info not provided when restoring. Populating sharding info from file.')\n"
        "logging.getLogger('meditron_jax.train').warning('kept: a real warning')\n"
        "warnings.warn('kept: a real Python warning')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _noise_in(proc.stderr) == [], proc.stderr
    assert "kept: a real warning" in proc.stderr and "kept: a real Python warning" in proc.stderr


def test_native_noise_filter_keeps_everything_else_in_order():
    noise = [
        b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        b"I0000 00:00:1796143783.060175   20843 port.cc:153] oneDNN custom operations are on. You may see ...",
        b"I0000 00:00:1796143783.061065   20843 cudart_stub.cc:31] Could not find cuda drivers on your machine",
        b"E0000 00:00:1796143783.1   20843 cuda_dnn.cc:8310] Unable to register cuDNN factory",
        b"To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the "
        b"appropriate compiler flags.",
        b"normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use identity normalization.",
        b"Failed to find host bounds for accelerator type: WARNING: could not determine TPU accelerator type, "
        b"please set env var `TPU_ACCELERATOR_TYPE` manually, otherwise libtpu.so may not properly initialize.",
        b"WARNING: Logging before InitGoogle() is written to STDERR",
        b"E0000 00:00:1796146229.537375   26322 common_lib.cc:554] INVALID_ARGUMENT: Error: unexpected worker "
        b"hostname 'WARNING: could not determine TPU worker hostnames or IP addresses' from env var "
        b"TPU_WORKER_HOSTNAMES. Expecting a valid hostname or IP address without port number.",
        b"=== Source Location Trace: ===",
        b"learning/45eac/tfrc/runtime/libtpu_init_utils.cc:327",
    ]
    kept = [
        b"E0000 00:00:1796143783.1   20843 some_op.cc:12] a real TensorFlow error",
        b"Traceback (most recent call last):",
        b'  File "x.py", line 1, in <module>',
        b"error: something the user must read",
        b"",
    ]
    # A location trace under a kept error is kept; under a dropped line, dropped.
    trace = [b"=== Source Location Trace: ===", b"some/runtime/file.cc:12"]
    kept = [*kept[:1], *trace, *kept[1:]]
    mixed = [kept[0], kept[1], kept[2], noise[0], noise[1], kept[3], noise[2], kept[4], noise[3], noise[4]]
    mixed += [noise[5], *noise[6:], kept[5], kept[6]]
    data = b"\n".join(mixed) + b"\n" + b"a last line without newline"
    proc = subprocess.run([sys.executable, "-I", FILTER], input=data, capture_output=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout == b"\n".join(kept) + b"\n" + b"a last line without newline"


def test_a_crash_message_still_gets_through_the_filter():
    code = (
        "import os\n"
        "from meditron_jax.cli.common import filter_native_stderr\n"
        "filter_native_stderr()\n"
        "os.write(2, b'I0000 00:00:1.5 7 port.cc:1] oneDNN custom operations are on\\nthe last words\\n')\n"
        "os.abort()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "the last words" in proc.stderr and "oneDNN" not in proc.stderr


def test_beam_import_noise_is_dropped_before_flags_are_parsed():
    # Beam logs on the root logger while it is imported, before a command (meditron-prepare-data) parses --verbose.
    code = "import meditron_jax.cli.common, apache_beam.io.gcp.bigquery"
    quiet = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    loud = subprocess.run(
        [sys.executable, "-c", code, "--verbose"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert "apitools not found" not in quiet.stderr and "apitools not found" in loud.stderr


@pytest.mark.parametrize("verbose", [False, True])
def test_gin_search_misses_are_not_logged_as_errors_even_verbose(tmp_path, verbose):
    # gin's resource reader logs "ERROR Path not found" for each search-path entry that lacks a file a later entry
    # has; a file missing everywhere must still fail loudly.
    (tmp_path / "found").mkdir()
    (tmp_path / "found" / "x.gin").write_text("A = 1\n")
    code = (
        "import sys, gin\n"
        "from meditron_jax.cli.common import quiet_startup\n"
        f"quiet_startup({verbose})\n"
        f"gin.add_config_file_search_path({str(tmp_path / 'empty')!r})\n"
        f"gin.add_config_file_search_path({str(tmp_path / 'found')!r})\n"
        "gin.parse_config_file('x.gin')\n"
        "print('parsed', flush=True)\n"
        "gin.parse_config_file('missing.gin')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert "parsed" in proc.stdout, proc.stderr
    assert "Path not found" not in proc.stderr
    assert proc.returncode != 0 and "Unable to open file: missing.gin" in proc.stderr
