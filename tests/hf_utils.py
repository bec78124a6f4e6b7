"""Helpers for parity tests against transformers' PyTorch Llama (the independent implementation)."""

import importlib.util
import pathlib
import sys

import numpy as np
import torch
import transformers


def random_hf_llama(
    tmp_path, *, heads=4, kv_heads=2, layers=2, hidden=64, inter=96, vocab=200, tied=False, seed=0, max_shard_size=None
):
    """Save a randomly initialised HF LlamaForCausalLM to ``tmp_path`` and return (path, torch model)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    # Default init leaves norms at exactly 1; randomise them so the norm weights are really tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(tmp_path), **kwargs)
    return str(tmp_path), model


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def hf_hidden_states(model, tokens) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), output_hidden_states=True)
    return [h.float().numpy() for h in out.hidden_states]


def assert_layers_match_transformers(cfg, params, hf_model, tokens, atol: float = 1e-5) -> None:
    """Every layer's output and the final norm's, ours (unscanned ``cfg``) against the HF model's hidden states."""
    import jax.numpy as jnp

    from meditron_jax.model import Llama

    _, state = Llama(cfg).apply(
        {"params": params}, jnp.asarray(tokens), capture_intermediates=True, mutable=["intermediates"]
    )
    inter = state["intermediates"]
    ref = hf_hidden_states(hf_model, tokens)  # [embeddings, layer 0 .. layer L-2 outputs, final-norm output]
    assert len(ref) == cfg.num_layers + 1
    for i in range(cfg.num_layers - 1):
        ours_i = np.asarray(inter[f"layers_{i}"]["__call__"][0][0])
        assert np.abs(ours_i - ref[i + 1]).max() <= atol, f"layer {i}"
    final = np.asarray(inter["final_norm"]["__call__"][0])
    assert np.abs(final - ref[-1]).max() <= atol


def load_script(name: str, folder: str = "scripts"):
    """Import ``<folder>/<name>.py`` (``scripts/``, ``bench/``) as a module: thin CLIs, not a package."""
    path = pathlib.Path(__file__).resolve().parents[1] / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
