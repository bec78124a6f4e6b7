"""Writes notebooks/meditron_jax_quickstart.ipynb (outputs stripped) from the cells below.

    .venv/bin/python notebooks/build_quickstart.py           # rewrite the notebook
    .venv/bin/python notebooks/build_quickstart.py --check   # exit 1 if the notebook is stale

Edit the cells here, not in the .ipynb: tests/test_notebook.py checks that the two agree and runs the notebook.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import nbformat

NOTEBOOK = pathlib.Path(__file__).resolve().parent / "meditron_jax_quickstart.ipynb"

CELLS: list[tuple[str, str]] = [
    (
        "markdown",
        """# meditron_jax quickstart

MEDITRON (Llama-2 continued on medical text, EPFL 2023) in JAX, end to end on a tiny model in a minute or two
on a CPU:

1. load a model, 2. shard it over the available devices, 3. train a few steps on the GAP-REPLAY sample with a
live loss plot, 4. evaluate a handful of PubMedQA / MedQA items (top-token and chain-of-thought), 5. export to
Hugging Face and reload with `transformers`.

**Colab:** *Runtime → Change runtime type* picks a TPU or GPU; the next cell installs the package (Python
3.11 or 3.12, setup.cfg's `python_requires`; Colab's is 3.12). **Locally:** run it in the project's
`.venv` (`bash scripts/setup_env.sh`); nothing is installed.""",
    ),
    (
        "code",
        """import importlib.util
import os
import shutil
import subprocess
import sys

REPO = "git+https://github.com/YOUR_ORG/meditron_jax"  # where this project's repository lives

if importlib.util.find_spec("meditron_jax") is None:
    on_tpu = bool(os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_ACCELERATOR_TYPE")) or os.path.exists(
        "/dev/accel0"
    )
    packages = [f"meditron_jax[{'tpu' if on_tpu else ''}] @ {REPO}", "transformers==5.24.0", "matplotlib"]
    if not on_tpu and shutil.which("nvidia-smi"):
        packages.append("jax[cuda12]==0.10.2")  # the CUDA build of the JAX version the package pins
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *packages])

# No accelerator: split the CPU into 8 devices so that the sharding below is visible. This must happen before
# JAX starts; it only affects the CPU platform (a TPU or GPU runtime uses its accelerators).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow (the data pipeline) start-up chatter
# Colab's GPU runtime ships torch with triton; importing triton after TensorFlow kills the kernel (seen with
# triton 3.7.1 on Python 3.11 and 3.12, CONTRIBUTING.md), so it is imported first when it is there.
if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401""",
    ),
    (
        "code",
        """import pathlib
import tempfile
import time

import jax
import numpy as np

import meditron_jax
from meditron_jax.cli.common import quiet_startup
from meditron_jax.data.paths import shared_data_dir

quiet_startup(verbose=False)
print(f"JAX {jax.__version__} on {jax.default_backend()}: {len(jax.devices())} devices {jax.devices()[:4]}...")

# The project's shared data when it is there (a checkout next to ../shared/data, or MEDITRON_SHARED_DATA);
# otherwise the 1.9 MB sample inside the package.
EMBEDDED = pathlib.Path(meditron_jax.__file__).parent / "embedded_data"
SHARED = shared_data_dir()
HAVE_SHARED = (SHARED / "stories260K_hf").is_dir()
os.environ["MEDITRON_SHARED_DATA"] = str(SHARED if HAVE_SHARED else EMBEDDED)  # read by the data modules
WORK = pathlib.Path(tempfile.mkdtemp(prefix="meditron_notebook_"))  # everything this notebook writes
print("data:", os.environ["MEDITRON_SHARED_DATA"], "| work folder:", WORK)
T0 = time.perf_counter()""",
    ),
    (
        "markdown",
        """## 1. Load a model

`meditron_jax.load` reads a Hugging Face Llama folder, a meditron_jax checkpoint or a training run's folder.
With the shared data this is Karpathy's `stories260K` (a real 260K-parameter Llama-2 trained on TinyStories);
without it, a randomly initialised tiny Llama-2 with Llama-2's tokenizer.""",
    ),
    (
        "code",
        """from flax import linen as nn

from meditron_jax.api import LanguageModel
from meditron_jax.config import get_config
from meditron_jax.data.vocabulary import Tokenizer
from meditron_jax.model import Llama

if HAVE_SHARED:
    lm = meditron_jax.load(SHARED / "stories260K_hf")
else:
    tokenizer = Tokenizer(EMBEDDED / "llama2_tokenizer" / "tokenizer.model")
    cfg = get_config("tiny", vocab_size=tokenizer.vocab_size)
    params = Llama(cfg).init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"]
    lm = LanguageModel(cfg, nn.meta.unbox(params), tokenizer)

n_params = sum(x.size for x in jax.tree.leaves(lm.params))
print(
    f"{n_params:,} parameters: {lm.config.num_layers} layers, width {lm.config.hidden_size}, "
    f"{lm.config.num_heads} query / {lm.config.num_kv_heads} key-value heads, vocabulary {lm.config.vocab_size}"
)
print("greedy:", repr("Once upon a time" + lm.generate(["Once upon a time"], max_new_tokens=24)[0]))""",
    ),
    (
        "markdown",
        """## 2. Shard it over the devices

Parameters carry *logical* axis names (`embed`, `heads`, `mlp`, ...); the rules in
`meditron_jax.parallel.rules` map them onto the mesh axes `data / stage / fsdp / sequence / tensor`. The
default mesh puts every device on `fsdp` (ZeRO-3 style: each device holds 1/N of every weight).""",
    ),
    (
        "code",
        """from meditron_jax.model import abstract_params
from meditron_jax.parallel.mesh import MeshConfig, create_mesh, describe
from meditron_jax.parallel.rules import logical_axis_rules, resolve_rules, sharding_report

mesh = create_mesh(MeshConfig(ici_fsdp=-1))  # all devices on fsdp; e.g. MeshConfig(ici_fsdp=-1, ici_tensor=4)
print("mesh:", describe(mesh))
rules = resolve_rules(logical_axis_rules(), lm.config, dict(mesh.shape)).rules
logical = nn.get_partition_spec(abstract_params(lm.config))
shardings = nn.logical_to_mesh_sharding(logical, mesh, rules)
sharded = jax.device_put(lm.params, shardings)
print(sharding_report(sharded, shardings, mesh).table(max_rows=8))
print("\\nthe embedding table", sharded["embedding"].shape, "across the devices:")
jax.debug.visualize_array_sharding(sharded["embedding"])""",
    ),
    (
        "markdown",
        """## 3. Train on a small mixture, with a live loss plot

MEDITRON continued Llama-2 on GAP-REPLAY: clinical guidelines, PubMed abstracts, PubMed Central papers and a
little general "replay" text, mixed by token share. Here the same curation pipeline cleans the packaged
sample, and a tiny Llama-2 with MEDITRON's 32,017-token vocabulary trains on the SeqIO mixture `gap_replay`
(the stories model above cannot: its 512-token vocabulary does not cover the medical text's tokenizer).
`TrainStep` is the sharded step the `meditron-train` command runs; here it is called in a plain loop.""",
    ),
    (
        "code",
        """import json

# The meditron-prepare-data command, in its own process: Apache Beam switches to its interactive mode inside a
# notebook kernel, which needs other pandas versions than the rest of the stack.
flags = {
    "--input_dir": EMBEDDED / "gap_replay_sample",
    "--output_dir": WORK / "curated",
    "--num_shards": 1,
    "--contamination_refs": "pubmedqa/test",  # drop training text that quotes PubMedQA's test items
    "--tokenizer_model": EMBEDDED / "llama2_tokenizer" / "tokenizer.model",
}
argv = [str(word) for flag in flags.items() for word in flag]
curate = subprocess.run([sys.executable, "-m", "meditron_jax.cli.prepare_data", *argv], capture_output=True, text=True)
if curate.returncode:
    raise RuntimeError(f"curation failed:\\n{curate.stderr[-3000:]}")
stats = json.loads((WORK / "curated" / "stats.json").read_text())
for source, row in stats["sources"].items():
    print(f"{source:17s}", {split: v["tokens"] for split, v in row["output"].items()}, "tokens")""",
    ),
    (
        "code",
        """import gin
import matplotlib.pyplot as plt
import seqio
from IPython.display import display

import meditron_jax.data.tasks  # noqa: F401  (registers the SeqIO tasks and mixtures)
from meditron_jax.data.pipeline import make_iterator
from meditron_jax.parallel import distributed
from meditron_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from meditron_jax.train.step import TrainStep

TRAIN_STEPS, BATCH, SEQ_LEN = 15, 8, 64  # MEDITRON-7B: 1,600 rows of 2,048 tokens a step

gin.bind_parameter("curated_data_dir.path", str(WORK / "curated"))  # as --gin.curated_data_dir.path=...
vocab = seqio.get_mixture_or_task("gap_replay").output_features["targets"].vocabulary
tokenizer = vocab.tokenizer
config = get_config("tiny", vocab_size=tokenizer.vocab_size)
opt = OptimizerConfig(peak_lr=3e-3, warmup_steps=3, train_steps=TRAIN_STEPS)
step = TrainStep(config, mesh, make_optimizer(opt), lr_schedule=learning_rate_schedule(opt))
state = step.init_state(jax.random.PRNGKey(0))  # created directly in its shardings
batches = make_iterator("gap_replay", batch_size=BATCH, sequence_length=SEQ_LEN, shuffle_buffer_size=64)

fig, ax = plt.subplots(figsize=(6, 3))
ax.set(xlabel="step", ylabel="loss", title="GAP-REPLAY sample, tiny Llama-2")
(line,) = ax.plot([], [], marker=".")
plot = display(fig, display_id=True)
losses = []
for _ in range(TRAIN_STEPS):
    batch = distributed.global_batch(next(batches), step.batch_sharding, BATCH)
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    line.set_data(range(1, len(losses) + 1), losses)
    ax.relim()
    ax.autoscale_view()
    plot.update(fig)
plt.close(fig)
assert losses[-1] < losses[0], "the loss did not go down"
print(
    f"loss {losses[0]:.2f} -> {losses[-1]:.2f} (uniform guessing: ln {config.vocab_size} = "
    f"{np.log(config.vocab_size):.2f})"
)""",
    ),
    (
        "markdown",
        """## 4. Evaluate: top-token and chain-of-thought

`Evaluator` runs MEDITRON's strategies: **top-token** (greedy, as many new tokens as the answer has, stop at
`###`) and **CoT** (the prompt asks for reasoning first; capped here at 32 tokens). A model trained for a few
seconds answers nothing parseable; the point is the pipeline (prompt → generation → parsed answer → score).
MedQA runs when the shared data is there (the package's sample has PubMedQA only).""",
    ),
    (
        "code",
        """from meditron_jax.eval.runner import Evaluator, Settings

trained = LanguageModel(config, jax.device_get(state.params), tokenizer)
benchmarks = ["pubmedqa"] + (["medqa_4opt"] if (SHARED / "medqa").is_dir() and HAVE_SHARED else [])
for strategy in ("top_token", "cot"):
    evaluator = Evaluator(
        Settings(strategy=strategy, cot_max_new_tokens=32),
        tokenizer=tokenizer,
        max_length=config.max_position_embeddings,
        engine=trained.engine(),
        progress=False,
    )
    out = WORK / f"eval_{strategy}"
    out.mkdir()
    for benchmark in benchmarks:
        rows = evaluator.run(benchmark, out, limit=3, limit_seed=0)  # 3 items, a seeded sample
        for r in rows:
            print(
                f"{strategy:9s} {benchmark:10s} gold {r['gold']!r:6s} parsed {r['answer']!r:6s} "
                f"output {r['outputs'][0][:50]!r}"
            )
print(f"\\none question as the model saw it:\\n{rows[0]['prompt'][-400:]}")""",
    ),
    (
        "markdown",
        """## 5. Export to Hugging Face, reload with `transformers`

`save_hf` writes `config.json`, safetensors and the tokenizer (the same as `meditron-convert --to hf`). The
folder loads in PyTorch `transformers`; greedy generation must give the same text in both.""",
    ),
    (
        "code",
        """import torch
from transformers import LlamaForCausalLM

from meditron_jax.convert.hf import save_hf
from meditron_jax.infer.sampling import SamplingParams

(WORK / "tokenizer").mkdir()
vocab.write_tokenizer_files(WORK / "tokenizer")
save_hf(jax.device_get(state.params), config, str(WORK / "hf"), tokenizer_dir=str(WORK / "tokenizer"))
print(sorted(p.name for p in (WORK / "hf").iterdir()))

prompt = "Does aspirin reduce the risk of stroke?"
ids = tokenizer.encode(prompt, bos=True)
reloaded = meditron_jax.load(WORK / "hf")  # our loader on the export
greedy = SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=(config.eos_token_id,))
ours = reloaded.engine().generate([ids], greedy)[0][0].token_ids

hf_model = LlamaForCausalLM.from_pretrained(WORK / "hf", dtype=torch.float32).eval()
with torch.no_grad():
    hf_logits = hf_model(torch.tensor([ids])).logits[0].numpy()
    theirs = hf_model.generate(
        torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=config.eos_token_id
    )[0, len(ids) :].tolist()
diff = float(np.max(np.abs(reloaded.logits([ids])[0] - hf_logits)))
print(f"meditron_jax : {list(ours)} {tokenizer.decode(list(ours))!r}")
print(f"transformers : {theirs} {tokenizer.decode(theirs)!r}")
print(f"max |logit difference| {diff:.1e}")
# float32 on both sides: only the order of floating-point sums differs (typically ~1e-6 here).
assert list(ours) == theirs and diff < 1e-3
print(f"notebook done in {time.perf_counter() - T0:.0f} s")""",
    ),
    (
        "markdown",
        """## Next

* The same stages as commands, on the packaged sample: `meditron-quickstart` (README).
* Real runs: `meditron-train --gin_file=runs/pretrain_7b.gin --gin.MODEL_DIR="'gs://bucket/run'" ...`
  (docs/training.md), on a TPU pod with `scripts/launch_tpu.sh` (docs/training.md, "Launching on a TPU pod").
* Evaluation at MEDITRON's settings: `meditron-eval --checkpoint DIR --benchmark medqa_4opt` (docs/evaluation.md).""",
    ),
]


def build() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    }
    make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    for i, (kind, source) in enumerate(CELLS):
        cell = make[kind](source)
        cell["id"] = f"cell-{i:02d}"  # stable ids: a rebuild is byte-identical
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render() -> str:
    return nbformat.writes(build()) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if the notebook differs from these cells")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not NOTEBOOK.exists() or NOTEBOOK.read_text() != text:
            print(f"{NOTEBOOK} is stale: run python notebooks/build_quickstart.py", file=sys.stderr)
            return 1
        return 0
    NOTEBOOK.write_text(text)
    print(f"wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
