"""An lm-evaluation-harness model class over meditron_jax checkpoints.

Importing this module registers the model as ``meditron_jax`` (alias ``meditron-jax``) with
``lm_eval.api.registry.register_model``. lm-eval 0.4.13 has no plug-in entry point for models (its
registry only knows its own ``MODEL_MAPPING``), so its ``lm_eval`` command cannot find ours; run the
harness through this module instead, with the same arguments::

    python -m meditron_jax.eval.lm_eval_adapter --model meditron_jax --model_args path=DIR \\
        --tasks TASK [--include_path TASKS_DIR] ...

or, from Python, ``import meditron_jax.eval.lm_eval_adapter`` before ``lm_eval.simple_evaluate(model="meditron_jax")``.
``write_local_tasks(dir)`` writes multiple-choice task YAMLs over the shared MedQA / PubMedQA files
for ``--include_path`` (nothing downloads).

Scoring is :class:`meditron_jax.eval.loglik.LoglikScorer` (the same numbers as lm-eval's ``hf`` model
on the transformers copy of a checkpoint, see tests/test_eval_lm_eval.py); generation is the
project's :class:`meditron_jax.infer.engine.Engine`.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

try:
    import lm_eval.models  # noqa: F401  (registers lm-eval's models first: get_model does so only on an empty registry)
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # depends on the environment
    raise ImportError(
        "meditron_jax.eval.lm_eval_adapter needs lm-evaluation-harness: pip install lm-eval==0.4.13 "
        "accelerate==1.15.0 (both in the project's test extra)"
    ) from e

from meditron_jax.eval.loglik import LoglikScorer

MODEL_NAMES = ("meditron_jax", "meditron-jax")


def _flag(value, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


@register_model(*MODEL_NAMES)
class MeditronJaxLM(TemplateLM):
    """``--model_args path=DIR[,dtype=float32][,batch_size=8][,add_bos_token=True][,max_length=N]``
    ``[,max_gen_toks=256]``."""

    def __init__(
        self,
        path: str | None = None,
        pretrained: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 8,
        add_bos_token: bool | str | None = True,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **kwargs,
    ):
        super().__init__()
        from meditron_jax import api

        path = path or pretrained
        if not path:
            raise ValueError("meditron_jax needs --model_args path=DIR (an HF or meditron_jax checkpoint folder)")
        # lm-eval passes device=... and others meant for torch models: they do not apply here.
        kwargs.pop("device", None)
        if kwargs:
            print(f"meditron_jax: ignoring model args {sorted(kwargs)}", file=sys.stderr)
        self.lm = api.load(path, dtype=dtype) if dtype else api.load(path)
        if self.lm.tokenizer is None:
            raise ValueError(f"{path} has no tokenizer.model")
        self.tokenizer = self.lm.tokenizer
        self.add_bos_token = _flag(add_bos_token, True)
        self._max_length = int(max_length or self.lm.config.max_position_embeddings)
        self._batch_size = 8 if str(batch_size) == "auto" else int(str(batch_size).split(":")[0])
        self.max_gen_toks = int(max_gen_toks)
        self.scorer = LoglikScorer(
            self.lm.config, self.lm.params, batch_size=self._batch_size, max_length=self._max_length
        )
        self._engine = None

    # -- tokens -----------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id  # the context of an empty-context request, as HFLM with a BOS token

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else bool(add_special_tokens) and self.add_bos_token
        if string.startswith("<s>"):  # the text already holds BOS
            string, bos = string[3:], True
        return self.tokenizer.encode(string, bos=bos)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(list(tokens))

    # -- scoring ----------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self.scorer.score([(ctx, cont) for _, ctx, cont in requests])
        out = []
        for (key, _, _), r in zip(requests, results, strict=True):
            out.append((r.logprob, r.is_greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (r.logprob, r.is_greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of the context length (HFLM's method)."""
        out = []
        for req in requests:
            (string,) = req.args
            windows = [
                lm_utils.make_disjoint_window(w)
                for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(r.logprob for r in self.scorer.score(windows))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    # -- generation -------------------------------------------------------------------------------------

    def _get_engine(self):
        if self._engine is None:
            from meditron_jax.infer.engine import Engine

            self._engine = Engine(self.lm.config, self.lm.params, self.tokenizer)
        return self._engine

    def _sampling(self, gen_kwargs: dict):
        from meditron_jax.infer.engine import SamplingParams

        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks)))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if not _flag(kwargs.pop("do_sample", None), temperature > 0):
            temperature = 0.0
        if self.max_length - max_new < 1:
            raise ValueError(f"max_gen_toks {max_new} leaves no room in the {self.max_length}-token context")
        return SamplingParams(
            max_new_tokens=max_new,
            temperature=temperature,
            top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
            stop_token_ids=(self.tokenizer.eos_id,),
            stop_strings=tuple(s for s in until if s),
            seed=int(kwargs.pop("seed", 0) or 0),
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations cut at the request's ``until`` strings (or EOS); requests with the same generation
        settings go to the engine together. Contexts are left-truncated to fit, as HFLM does."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for idx in groups.values():
            sampling = self._sampling(requests[idx[0]].args[1])
            room = self.max_length - sampling.max_new_tokens
            prompts = [self.tok_encode(requests[i].args[0])[-room:] for i in idx]
            for i, comps in zip(idx, self._get_engine().generate(prompts, sampling), strict=True):
                out[i] = comps[0].text
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------
# Local multiple-choice tasks over the shared benchmark files
# ------------------------------------------------------------------------------------------------------

_MEDQA_YAML = """\
task: meditron_medqa_4opt
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nA. {{{{options.A}}}}\\nB. {{{{options.B}}}}\\n\\
  C. {{{{options.C}}}}\\nD. {{{{options.D}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer_idx)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

_PUBMEDQA_YAML = """\
task: meditron_pubmedqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}\\nQuestion: {{{{question}}}}\\nAnswer:"
doc_to_choice: ["yes", "no", "maybe"]
doc_to_target: "{{{{['yes', 'no', 'maybe'].index(answer)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_local_tasks(
    folder: str | os.PathLike, data_dir: str | os.PathLike | None = None, *, overwrite: bool = False
) -> pathlib.Path:
    """Write ``meditron_medqa_4opt`` and ``meditron_pubmedqa`` task YAMLs (and PubMedQA's test items as
    JSONL) into ``folder``, for ``--include_path folder``. Reads the shared data, downloads nothing.
    An existing file of the same name with other content is an error unless ``overwrite``."""
    from meditron_jax.data import benchmarks as bm
    from meditron_jax.data.paths import shared_data_dir

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    root = pathlib.Path(data_dir) if data_dir is not None else shared_data_dir()
    medqa = root / "medqa" / "phrases_no_exclude_test.jsonl"
    if not medqa.is_file():
        raise FileNotFoundError(f"{medqa} is missing")
    pubmed = folder / "pubmedqa_test.jsonl"
    keys = ("id", "context", "question", "answer")
    rows = bm.load_benchmark("pubmedqa", "test", data_dir=root)
    files = {
        pubmed: "".join(json.dumps({k: r[k] for k in keys}) + "\n" for r in rows),
        folder / "meditron_medqa_4opt.yaml": _MEDQA_YAML.format(data=json.dumps(str(medqa))),
        folder / "meditron_pubmedqa.yaml": _PUBMEDQA_YAML.format(data=json.dumps(str(pubmed))),
    }
    clash = [p for p, text in files.items() if p.exists() and p.read_text(encoding="utf-8") != text]
    if clash and not overwrite:
        raise FileExistsError(f"{clash[0]} exists with other content; choose another folder or pass overwrite")
    for p, text in files.items():
        p.write_text(text, encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> None:
    """The lm-eval command line with this model registered (``write_tasks DIR`` writes the local tasks)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["write_tasks"]:
        if len(argv) != 2:
            raise SystemExit("usage: python -m meditron_jax.eval.lm_eval_adapter write_tasks DIR")
        print(write_local_tasks(argv[1]))
        return
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
