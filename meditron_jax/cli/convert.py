"""Convert between Hugging Face Llama folders, meditron_jax orbax model folders and training runs.

meditron-convert --to orbax --input HF_DIR --output ORBAX_DIR
meditron-convert --to hf --input ORBAX_DIR --output HF_DIR [--dtype bfloat16]
meditron-convert --to hf --input RUN_DIR --output HF_DIR --tokenizer_dir TOKENIZER_DIR [--step N]

--input may be any of the three (a training run's MODEL_DIR: its newest checkpoint, or --step). The output
folder must be new, empty, or an earlier output of the same format (then it is replaced atomically);
anything else needs --overwrite. The output is never the input, inside it, or around it. A converted model
needs tokenizer.model to generate text: it is copied from --tokenizer_dir (default: the input), and a
conversion without one is refused unless --no_tokenizer says the weights alone are wanted.

--input, --tokenizer_dir: a folder or a Hugging Face hub id (epfl-llm/meditron-7b), read from the hub cache.
--to hf also writes a model card (README.md: architecture, the run's data mixture and hyperparameters from
its operative_config.gin, the tables of --eval_results DIR, a meditron-eval --output folder) and, with
--push_to_hub OWNER/NAME, uploads the folder to the hub:

meditron-convert --to hf --input RUN_DIR --output HF_DIR --eval_results EVAL_DIR --push_to_hub me/my-meditron
"""

import argparse
import json
import logging
import os
import sys

from meditron_jax.cli.common import add_verbose, quiet_startup, run

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work
log = logging.getLogger("meditron-convert")


def export_shardings(config):
    """Every parameter split FSDP-style over all local devices; the first device alone when there is one,
    or when the model's dimensions do not divide by their number."""
    import jax
    from flax import linen as nn

    from meditron_jax.model import logical_axes
    from meditron_jax.parallel import MeshConfig, create_mesh, logical_axis_rules, resolve_rules

    if jax.local_device_count() > 1:
        mesh = create_mesh(MeshConfig(ici_fsdp=jax.local_device_count(), dcn_data=1))
        try:
            rules = resolve_rules(logical_axis_rules(), config, dict(mesh.shape)).rules
        except ValueError:
            pass
        else:
            return nn.logical_to_mesh_sharding(logical_axes(config), mesh, rules)
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", choices=("orbax", "hf"), required=True, help="output format")
    parser.add_argument("--input", required=True, help="source: HF folder, orbax model folder, or a run's MODEL_DIR")
    parser.add_argument("--output", required=True, help="destination folder (new, or an earlier output: replaced)")
    parser.add_argument("--overwrite", action="store_true", help="replace an --output folder that holds other files")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="storage dtype of the output (default: as loaded)",
    )
    parser.add_argument("--step", type=int, default=None, help="training-run input: checkpoint step (default: newest)")
    parser.add_argument("--tokenizer_dir", default=None, help="where tokenizer.model comes from (default: --input)")
    parser.add_argument("--no_tokenizer", action="store_true", help="convert without tokenizer files")
    parser.add_argument("--max_shard_gb", type=float, default=5.0, help="safetensors shard size for --to hf")
    parser.add_argument(
        "--eval_results",
        action="append",
        default=[],
        metavar="DIR",
        help="--to hf: a meditron-eval --output folder (or its results.json) whose table goes into the model card; "
        "repeatable",
    )
    parser.add_argument(
        "--base_model",
        default=None,
        help="--to hf: the card's base_model hub id (default: the run's init_from if a hub id)",
    )
    parser.add_argument("--push_to_hub", default=None, metavar="OWNER/NAME", help="--to hf: upload the output there")
    parser.add_argument("--private", action="store_true", help="--push_to_hub: create the repository private")
    add_verbose(parser)
    args = parser.parse_args(argv)
    quiet_startup(args.verbose)

    from meditron_jax.convert import hf, hub, model_card, orbax, streaming
    from meditron_jax.convert.files import check_output_dir
    from meditron_jax.convert.model_dir import load_model_dir, model_dir_kind

    if not args.max_shard_gb > 0:  # also refuses NaN
        raise ValueError(f"--max_shard_gb {args.max_shard_gb} must be a positive number of GiB")
    if args.step is not None and args.step < 0:
        raise ValueError(f"--step {args.step} must be a checkpoint step (>= 0)")
    if args.to != "hf":
        given = [f for f in ("eval_results", "base_model", "push_to_hub", "private") if getattr(args, f)]
        if given:
            raise ValueError(f"--{given[0]} applies to --to hf (a model card and a hub upload are Hugging Face things)")
    if args.push_to_hub:
        hub.check_push_target(args.push_to_hub)
    evals = [model_card.read_eval_results(p) for p in args.eval_results]  # bad files fail before the slow part
    source = args.input
    args.input = hub.resolve_model_path(args.input)
    if args.tokenizer_dir:
        args.tokenizer_dir = hub.resolve_model_path(args.tokenizer_dir)
    kind = model_dir_kind(args.input)
    if args.step is not None and kind != "run":
        raise ValueError(f"--step applies to a training run's MODEL_DIR; {args.input} is a {kind} model folder")
    tok_dir = None if args.no_tokenizer else (args.tokenizer_dir or args.input)
    if tok_dir is not None and not os.path.isfile(os.path.join(tok_dir, "tokenizer.model")):
        hint = " (this training run's MODEL_DIR has none: pass the tokenizer's folder)" if kind == "run" else ""
        raise FileNotFoundError(
            f"{os.path.join(tok_dir, 'tokenizer.model')} does not exist{hint}; without it the converted model "
            "cannot generate text. Pass --tokenizer_dir DIR, or --no_tokenizer to convert the weights alone"
        )
    kind_out = hf.HF_OUTPUT if args.to == "hf" else orbax.ORBAX_OUTPUT
    inputs = [args.input, *([tok_dir] if tok_dir else [])]
    check_output_dir(args.output, kind_out, inputs=inputs, overwrite=args.overwrite)  # before the slow part

    log.info("reading %s (%s)", args.input, kind)
    overrides = {"param_dtype": args.dtype} if args.dtype and args.to == "orbax" else {}
    params, config = load_model_dir(args.input, step=args.step, lazy=True, **overrides)
    # Read straight into shards over the available devices (FSDP): the input never sits whole on the host
    # beside them (on GPUs or TPUs the host then holds about one tensor; with JAX_PLATFORMS=cpu, the default
    # here, the devices are host memory and hold the model once).
    params = streaming.place(params, export_shardings(config))
    record = {"source_kind": kind, "tokenizer": None if tok_dir is None else os.path.abspath(tok_dir)}
    if args.step is not None:
        record["step"] = args.step
    log.info("writing %s (%s)", args.output, args.to)
    common = dict(tokenizer_dir=tok_dir, inputs=[args.input], overwrite=args.overwrite, record=record)
    if args.to == "orbax":
        orbax.save_orbax(params, config, args.output, **common)
    else:
        hf.save_hf(
            params, config, args.output, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30), **common
        )
    if tok_dir is None:
        print(
            f"warning: {args.output} has no tokenizer (--no_tokenizer); pass --tokenizer_path when generating",
            file=sys.stderr,
        )
    print(f"wrote {args.output} ({config.num_params():,} parameters)")
    has = set(os.listdir(args.output)) if args.to == "hf" else set()
    if "tokenizer.model" in has and TOKENIZER_CONFIG not in has:  # a SentencePiece (Llama) tokenizer alone
        _write_tokenizer_config(args.output, config.max_position_embeddings)
    if args.to == "hf":
        card = _model_card(args, source, kind, config, evals)
        print(f"wrote {model_card.write(args.output, card)} (model card)")
    if args.push_to_hub:
        url = hub.push_model_dir(args.output, args.push_to_hub, private=args.private)
        print(f"uploaded {args.output} to {url}")
    return 0


TOKENIZER_CONFIG = "tokenizer_config.json"


def _write_tokenizer_config(out_dir: str, max_length: int) -> None:
    """transformers' AutoTokenizer settings for a folder that has tokenizer.model alone (a training run's):
    Llama-2's (BOS added, no EOS), with ``legacy`` on so that text after <|im_start|> keeps SentencePiece's
    leading-space piece, as meditron_jax's tokenizer and MEDITRON's chat format have it."""
    settings = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    tmp = os.path.join(out_dir, TOKENIZER_CONFIG + ".tmp")
    with open(tmp, "w") as f:
        json.dump(settings, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, TOKENIZER_CONFIG))


# Hub copies of what a mixture trains on. GAP-REPLAY: only its guidelines are released (MEDITRON.md §2);
# SFT: the train benchmark of each data.tasks.SFT_SOURCES entry (tests/test_hub.py checks they agree).
GAP_REPLAY_DATASETS = ("epfl-llm/guidelines",)
SFT_TRAIN_BENCHMARK = {
    "medqa": "medqa_5opt",
    "medmcqa": "medmcqa",
    "pubmedqa": "pubmedqa_artificial",
    "pubmedqa_pqal": "pubmedqa",
    "medmcqa_cot": "medmcqa",
    "pubmedqa_cot": "pubmedqa_artificial",
}


def mixture_datasets(mixture: str | None) -> list[str]:
    from meditron_jax.data.benchmarks import HUB_SOURCES

    if not mixture:
        return []
    if mixture.startswith("gap_replay"):
        return list(GAP_REPLAY_DATASETS)
    bench = SFT_TRAIN_BENCHMARK.get(mixture.removesuffix("_sft"))
    return [HUB_SOURCES[bench][0]] if bench in HUB_SOURCES else []


def _model_card(args, source: str, kind: str, config, evals) -> str:
    from meditron_jax.convert import hub, model_card

    operative = os.path.join(args.input, "operative_config.gin")
    text = open(operative).read() if kind == "run" and os.path.isfile(operative) else None
    bindings = model_card.parse_operative_config(text, operative) if text else {}
    stages = _earlier_stages(bindings)
    datasets = [d for b in [bindings, *(s[2] for s in stages)] for d in mixture_datasets(b.get("TrainConfig.mixture"))]
    base = args.base_model
    init_from = (stages[-1][2] if stages else bindings).get("TrainConfig.init_from")  # the first stage's start
    if base is None and isinstance(init_from, str) and hub.looks_like_hub_id(init_from):
        base = init_from
    if base is None and kind == "hf" and hub.looks_like_hub_id(source):
        base = source
    for ev in evals:
        evaluated = ev.payload.get("config", {}).get("checkpoint")
        if evaluated and os.path.realpath(evaluated) != os.path.realpath(args.input):
            print(f"warning: {ev.path} evaluated {evaluated}, not {args.input}", file=sys.stderr)
    what = {"run": "a meditron_jax training run", "orbax": "a meditron_jax model folder", "hf": "a Hugging Face folder"}
    step = ""
    if kind == "run":
        from meditron_jax.convert.model_dir import latest_run_step

        step = f" (step {args.step if args.step is not None else latest_run_step(args.input)})"
    return model_card.render(
        config,
        name=(args.push_to_hub or os.path.basename(os.path.abspath(args.output))),
        source=f"{what[kind]}{step}",
        operative_config=text,
        eval_results=evals,
        base_model=base,
        datasets=list(dict.fromkeys(datasets)),
        repo_id=args.push_to_hub,
        earlier_stages=[(folder, stage_text) for folder, stage_text, _ in stages],
    )


def _earlier_stages(bindings: dict, limit: int = 4) -> list[tuple[str, str, dict]]:
    """(folder, operative config, bindings) of the training runs this one continued from (init_from chains
    through local run folders), newest first."""
    from meditron_jax.convert import model_card

    stages: list[tuple[str, str, dict]] = []
    source = bindings.get("TrainConfig.init_from")
    while isinstance(source, str) and len(stages) < limit:
        path = os.path.join(source, "operative_config.gin")
        if not os.path.isfile(path):
            break
        text = open(path).read()
        stage = model_card.parse_operative_config(text, path)
        stages.append((source, text, stage))
        source = stage.get("TrainConfig.init_from")
    return stages


def console(argv=None) -> int:
    return run(main, argv)


if __name__ == "__main__":
    sys.exit(console())
