"""The model card (``README.md``) of a Hugging Face export: YAML front matter the hub reads (license, language,
tags, base model, datasets), then the architecture, the training data mixture and hyperparameters (from the
run's ``operative_config.gin``), the evaluation tables ``meditron-eval`` wrote, and how to load the model.

Plain inputs only (no data/eval imports): the caller finds the files and the dataset ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tokenize
from collections.abc import Mapping, Sequence
from typing import Any

from meditron_jax.config import ModelConfig

CARD_FILE = "README.md"
# MEDITRON's weights carry Llama 2's license (they are Llama-2 fine-tunes; MEDITRON.md §1).
LICENSE = "llama2"
TAGS = ("medical", "llama-2", "meditron", "meditron_jax", "jax")
# A Falcon export (ModelConfig.family "falcon") keeps its base model's license: Apache 2.0 for Falcon-7B/40B,
# TII's own for Falcon-180B; the card cannot tell which, so it says "other" and names them.
FALCON_LICENSE = "other"
FALCON_TAGS = ("medical", "falcon", "meditron", "meditron_jax", "jax")

# The bindings worth a table row, in this order; the whole operative config follows in a folded block.
_HYPERPARAMETERS = (
    "TrainConfig.mixture",
    "TrainConfig.init_from",
    "TrainConfig.sequence_length",
    "TrainConfig.global_batch",
    "TrainConfig.grad_accum_steps",
    "TrainConfig.train_steps",
    "TrainConfig.seed",
    "OptimizerConfig.peak_lr",
    "OptimizerConfig.warmup_steps",
    "OptimizerConfig.end_lr_ratio",
    "OptimizerConfig.horizon_factor",
    "OptimizerConfig.weight_decay",
    "OptimizerConfig.b1",
    "OptimizerConfig.b2",
    "OptimizerConfig.eps",
    "OptimizerConfig.clip_norm",
    "ModelConfig.dtype",
    "ModelConfig.param_dtype",
    "make_dataset.pack",
)


def parse_operative_config(text: str, source: str = "operative_config.gin") -> dict[str, Any]:
    """``{"Configurable.param": value}`` of a gin operative config, macros substituted, references kept as
    ``@name()`` text. gin's own parser reads it, so nothing needs to be registered."""
    from gin import config_parser

    class _Literal(config_parser.ParserDelegate):
        def configurable_reference(self, scoped_name, evaluate):
            return f"@{scoped_name}{'()' if evaluate else ''}"

        def macro(self, name):
            return f"%{name}"

    macros: dict[str, Any] = {}
    bindings: dict[str, Any] = {}
    try:
        for st in config_parser.ConfigParser(text, _Literal()):
            if not isinstance(st, config_parser.BindingStatement):
                continue
            key = "/".join(filter(None, (st.scope, st.selector)))
            if st.arg_name:
                bindings[f"{key}.{st.arg_name}"] = st.value
            else:
                macros[key] = st.value
    except (SyntaxError, tokenize.TokenError) as e:  # gin raises both for malformed text
        raise ValueError(f"{source}: not a gin config ({e})") from None
    for k, v in bindings.items():
        if isinstance(v, str) and v.startswith("%") and v[1:] in macros:
            bindings[k] = macros[v[1:]]
    return bindings


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """One ``meditron-eval`` output folder: its results.json payload and results.md table."""

    path: str
    payload: Mapping[str, Any]
    table: str


def read_eval_results(path: str) -> EvalResult:
    """A ``meditron-eval --output`` folder or its results.json; errors name the file."""
    json_path = os.path.join(path, "results.json") if os.path.isdir(path) else path
    try:
        with open(json_path) as f:
            payload = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--eval_results {path}: no {json_path} (a meditron-eval --output folder)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--eval_results {json_path}: not JSON ({e})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise ValueError(f"--eval_results {json_path}: no 'results' list (not written by meditron-eval)")
    md_path = os.path.join(os.path.dirname(json_path), "results.md")
    table = open(md_path).read().strip() if os.path.isfile(md_path) else _table(payload["results"])
    return EvalResult(json_path, payload, table)


def _table(results: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| benchmark | strategy | shots | n | accuracy % |", "|---|---|---|---|---|"]
    for r in results:
        acc = "—" if r.get("accuracy") is None else f"{100 * r['accuracy']:.1f}"
        lines.append(f"| {r.get('benchmark')} | {r.get('strategy')} | {r.get('shots')} | {r.get('n')} | {acc} |")
    return "\n".join(lines)


def _yaml_list(name: str, values: Sequence[str]) -> list[str]:
    return [f"{name}:", *(f"- {json.dumps(v)}" for v in values)] if values else []


def _architecture(config: ModelConfig) -> list[str]:
    if config.family == "falcon":
        return _falcon_architecture(config)
    rows = [
        ("parameters", f"{config.num_params():,}"),
        ("layers", config.num_layers),
        ("hidden size", config.hidden_size),
        ("MLP size (SwiGLU)", config.intermediate_size),
        ("attention heads / KV heads", f"{config.num_heads} / {config.num_kv_heads}"),
        ("vocabulary", f"{config.vocab_size:,}"),
        ("context (max positions)", f"{config.max_position_embeddings:,}"),
        ("RoPE theta", config.rope_theta),
        ("RMSNorm eps", config.rms_norm_eps),
        ("tied input/output embeddings", config.tie_word_embeddings),
    ]
    return [
        "Llama-2 decoder (`LlamaForCausalLM`): RMSNorm, rotary position embeddings, SwiGLU MLP, grouped-query "
        "attention when KV heads < heads.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
    ]


def _falcon_architecture(config: ModelConfig) -> list[str]:
    rows = [
        ("parameters", f"{config.num_params():,}"),
        ("layers", config.num_layers),
        ("hidden size", config.hidden_size),
        ("MLP size (GELU)", config.intermediate_size),
        ("attention heads / KV heads", f"{config.num_heads} / {config.num_kv_heads}"),
        ("attention and MLP in parallel", config.parallel_attn),
        ("LayerNorms per layer", config.parallel_norms if config.parallel_attn else 2),
        ("vocabulary", f"{config.vocab_size:,}"),
        ("context (max positions)", f"{config.max_position_embeddings:,}"),
        ("RoPE theta", config.rope_theta),
        ("LayerNorm eps", config.layer_norm_eps),
        ("tied input/output embeddings", config.tie_word_embeddings),
    ]
    return [
        "Falcon decoder (`FalconForCausalLM`): LayerNorm with bias, rotary position embeddings, GELU MLP, "
        "multi-query or grouped-query attention. License: the base Falcon's (Apache 2.0 for Falcon-7B/40B, "
        "the TII Falcon-180B license for 180B).",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
    ]


def _value(v: Any) -> str:
    return f"`{v!r}`" if isinstance(v, str) else f"`{v}`"


def _data(bindings: Mapping[str, Any], datasets: Sequence[str]) -> list[str]:
    mixture = bindings.get("TrainConfig.mixture")
    lines = [f"SeqIO mixture `{mixture}` (meditron_jax/data/tasks.py)."]
    rates = {k.split(".", 1)[1]: v for k, v in bindings.items() if k.startswith("gap_replay_rates.")}
    if rates and str(mixture).startswith("gap_replay"):
        total = sum(rates.values()) or 1.0
        lines += [
            "GAP-REPLAY: clinical guidelines, PubMed abstracts, PubMed Central papers and a general-domain replay "
            "sample, curated by `meditron-prepare-data`. Sampling shares of training tokens:",
            "",
            "| source | share |",
            "|---|---|",
            *(f"| {name} | {100 * r / total:.1f}% |" for name, r in sorted(rates.items())),
        ]
    elif str(mixture).endswith("_sft"):
        lines.append("Supervised fine-tuning: ChatML question and answer turns, loss on the answer turn only.")
    if datasets:
        lines += [
            "",
            "Public copies on the hub: " + ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in datasets),
        ]
    return lines


def render(
    config: ModelConfig,
    *,
    name: str,
    source: str,
    operative_config: str | None = None,
    eval_results: Sequence[EvalResult] = (),
    base_model: str | None = None,
    datasets: Sequence[str] = (),
    repo_id: str | None = None,
    earlier_stages: Sequence[tuple[str, str]] = (),
) -> str:
    """The card's Markdown text. ``earlier_stages``: (run folder, operative config) of the runs this one
    continued from, newest first (e.g. the pretraining run an SFT run started from)."""
    bindings = parse_operative_config(operative_config) if operative_config else {}
    falcon = config.family == "falcon"
    front = [
        "---",
        f"license: {FALCON_LICENSE if falcon else LICENSE}",
        *_yaml_list("language", ["en"]),
        *_yaml_list("tags", list(FALCON_TAGS if falcon else TAGS)),
        *([f"base_model: {json.dumps(base_model)}"] if base_model else []),
        *_yaml_list("datasets", list(datasets)),
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "---",
    ]
    body = [
        f"# {name}",
        "",
        f"A {'Falcon' if falcon else 'Llama-2'} model trained with meditron_jax, a JAX/Flax reimplementation of "
        "MEDITRON's recipe (Chen et al., arXiv 2311.16079; original code https://github.com/epfLLM/meditron), "
        f"exported to Hugging Face format from {source}."
        + (f" Initialised from `{base_model}`." if base_model else ""),
        "",
        "## Architecture",
        "",
        *_architecture(config),
        "",
        "## Training data",
        "",
    ]
    if bindings:
        body += _data(bindings, datasets)
    else:
        body.append("Not recorded: the exported checkpoint came without a training run's operative_config.gin.")
    for folder, text in earlier_stages:
        earlier = parse_operative_config(text, os.path.join(folder, "operative_config.gin"))
        steps = earlier.get("TrainConfig.train_steps")
        body += ["", f"### Earlier stage: `{folder}` ({steps} steps)", "", *_data(earlier, ())]
        rows = [(k, earlier[k]) for k in _HYPERPARAMETERS if k in earlier]
        body += ["", "| setting (gin) | value |", "|---|---|", *(f"| `{k}` | {_value(v)} |" for k, v in rows)]
    body += ["", "## Training hyperparameters", ""]
    if bindings:
        rows = [(k, bindings[k]) for k in _HYPERPARAMETERS if k in bindings]
        body += ["| setting (gin) | value |", "|---|---|", *(f"| `{k}` | {_value(v)} |" for k, v in rows)]
        body += [
            "",
            "<details><summary>The run's whole operative gin config</summary>",
            "",
            "```",
            operative_config.strip() if operative_config else "",
            "```",
            "",
            "</details>",
        ]
    else:
        body.append("Not recorded (no operative_config.gin).")
    body += ["", "## Evaluation", ""]
    if eval_results:
        for ev in eval_results:
            cfg = ev.payload.get("config", {})
            of = f" of `{cfg['checkpoint']}`" if cfg.get("checkpoint") else ""
            body += [
                f"`meditron-eval`{of} ({os.path.basename(os.path.dirname(ev.path)) or ev.path}; n = items scored):",
                "",
                ev.table,
                "",
            ]
    else:
        body += ["No evaluation was attached to this export (`meditron-convert --eval_results DIR`).", ""]
    where = repo_id or "PATH_OR_REPO_ID"
    body += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        "",
        "import meditron_jax",
        f'lm = meditron_jax.load("{where}")',
        'print(lm.generate(["A 45-year-old man presents with"], max_new_tokens=64))',
        "```",
        "",
        "Research use only: not medical advice, not validated for clinical decisions (as MEDITRON's own card says).",
    ]
    return "\n".join(front + [""] + body) + "\n"


def write(out_dir: str, text: str) -> str:
    """Write the card next to the weights (temporary file, then rename)."""
    path = os.path.join(out_dir, CARD_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path
