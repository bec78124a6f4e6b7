"""The benchmark scripts' printed tables (bench/), from recorded numbers: no timing runs here."""

from .hf_utils import load_script


def _row(step_time_s, **extra):
    tokens = 2048
    return {
        "tokens_per_s": tokens / step_time_s,
        "step_time_s": step_time_s,
        "best_step_time_s": step_time_s * 0.98,
        "flops_per_token": 0.714e9,
        "gflops_per_s": 0.714 * tokens / step_time_s,
        **extra,
    }


def test_train_table_names_maxtexts_remat_and_compares_only_rows_that_took_turns():
    tt = load_script("train_throughput", folder="bench")
    results = {
        "matmul": {"flops": 2 * 4096**3, "step_time_s": 0.79, "n": 4096, "step_times_s": [0.8, 0.79, 0.81]},
        "peak_flops": 181.9e9,
        "ours": _row(8.43, alternated_with=["ours_tokens", "transformers"], mfu=0.95),
        "transformers": _row(9.61, alternated_with=["ours", "ours_tokens"]),
        "maxtext": _row(15.65, note="remat_policy=full"),
    }
    lines = tt.table(results).splitlines()
    (ours,) = [line for line in lines if line.startswith("| meditron_jax TrainStep, packed batch")]
    (maxtext,) = [line for line in lines if line.startswith("| MaxText")]
    assert maxtext.startswith("| MaxText (remat_policy=full) | 131 | 15.65 (15.34) |")
    assert maxtext.endswith("| — |")  # its own process, after the others: no ratio to transformers
    assert ours.endswith("| 95.0% | 1.14 |")  # 9.61 / 8.43, taken in turns
