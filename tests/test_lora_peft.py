"""LoRA exactness against transformers + PEFT (the oracle), float32, tiny synthetic checkpoints.

The intermediate width differs from the hidden width so that a mix-up of the experts' in/out
sides, or of PEFT's nested expert wrappers, changes shapes and fails loudly.
"""
from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_gptoss.loading import load
from mlx_gptoss.lora import (
    ADAPTER_CONFIG,
    AdapterError,
    LoraConfig,
    adapter_tensors,
    apply_lora,
    load_adapter,
    lora_modules,
    peft_keys,
    remove_lora,
    save_adapter,
    to_peft,
)
from mlx_gptoss.train import Batch, loss_and_grad

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

ALL_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.router.weight"]
RANK, ALPHA = 4, 12


@pytest.fixture(scope="module")
def lora_checkpoint(checkpoint_factory):
    return checkpoint_factory("lora_tiny", seed=7, intermediate_size=32, num_hidden_layers=2,
                              vocab_size=512)


def torch_base(path):
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True))
    model.eval()
    return model


def peft_model(path, **overrides):
    from peft import LoraConfig as PeftConfig, get_peft_model

    cfg = PeftConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "k_proj", "v_proj",
                                                                "o_proj"],
                     target_parameters=ALL_PARAMETERS, init_lora_weights=False, **overrides)
    torch.manual_seed(0)
    model = get_peft_model(torch_base(path), cfg)
    with torch.no_grad():  # deltas large enough to matter, small enough to keep the routing
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(0.5)
    return model


def tokens(seed=0, shape=(2, 21), vocab=512):
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


def ours(path):
    model, _ = load(path, "float32")
    return model


def test_peft_made_adapter_gives_peft_logits(lora_checkpoint, tmp_path):
    reference = peft_model(lora_checkpoint)
    reference.save_pretrained(tmp_path)
    ids = tokens()
    with torch.no_grad():
        want = reference(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    with torch.no_grad():
        with reference.disable_adapter():
            base = reference(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    model = load_adapter(ours(lora_checkpoint), tmp_path)
    assert len(lora_modules(model)) == 2 * 7
    got = np.array(model(mx.array(ids)))
    assert np.abs(want - base).max() > 0.05  # the adapter really changes the logits
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Incremental decoding (the compiled one-token path) sees the adapters too.
    cache = model.make_cache()
    model(mx.array(ids[:1, :-1]), cache=cache)
    step = np.array(model(mx.array(ids[:1, -1:]), cache=cache))[0, -1]
    np.testing.assert_allclose(step, want[0, -1], rtol=1e-4, atol=1e-4)


def test_our_adapter_loads_in_peft(lora_checkpoint, tmp_path):
    from peft import PeftModel

    model = apply_lora(ours(lora_checkpoint), LoraConfig(rank=RANK, alpha=ALPHA, targets=("all",),
                                                         layers=(1,)))
    rng = np.random.default_rng(1)
    for _, module in lora_modules(model):
        module.lora_b = mx.array(rng.normal(0, 0.3, module.lora_b.shape).astype(np.float32))
    save_adapter(model, tmp_path, str(lora_checkpoint))
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA
    ids = tokens(2)
    got = np.array(model(mx.array(ids)))
    reference = PeftModel.from_pretrained(torch_base(lora_checkpoint), tmp_path)
    names = {n.replace(".default", "") for n, _ in reference.named_parameters() if "lora_" in n}
    assert names == set(adapter_tensors(model))  # every tensor landed on a PEFT module
    with torch.no_grad():
        want = reference(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Removing the adapters restores the base exactly.
    base = np.array(remove_lora(model)(mx.array(ids)))
    assert np.abs(base - got).max() > 0.05


# (2, 19): 72 (token, expert) pairs, the experts' sorted gather path; (1, 9): 16, unsorted.
# Kernels "blas": in training mode on the CPU the frozen head, attention and router multiply
# through numpy's BLAS (`mlx_gptoss.blas`); "mlx": MLX's own kernels throughout, as on a GPU.
@pytest.mark.slow
@pytest.mark.parametrize("shape, grad_checkpoint, kernels", [
    ((2, 19), False, "blas"), ((1, 9), True, "blas"), ((2, 19), True, "mlx")])
def test_loss_and_every_gradient_equal_peft(lora_checkpoint, tmp_path, shape, grad_checkpoint,
                                            kernels):
    reference = peft_model(lora_checkpoint)
    reference.save_pretrained(tmp_path)
    model = load_adapter(ours(lora_checkpoint), tmp_path)
    model.train(kernels == "blas")
    ids = tokens(3, shape)
    weights = np.zeros(ids.shape, dtype=np.float32)
    weights[0, 3:8] = 1
    weights[-1, 6:] = 1
    # ours: inputs ids[:, :-1], targets ids[:, 1:] where the target position is trained
    width = ids.shape[1] - 1
    trained = np.nonzero(weights[:, 1:].reshape(-1))[0]
    batch = Batch(mx.array(ids[:, :-1]), mx.array(trained.astype(np.int32)),
                  mx.array(ids[:, 1:].reshape(-1)[trained]))
    loss, grads, count = loss_and_grad(model, [batch], chunk=7, grad_checkpoint=grad_checkpoint,
                                       head="auto" if kernels == "blas" else "mlx")
    assert count == len(trained)
    # PEFT: the same mean cross-entropy over the same targets
    reference.train()
    logits = reference(torch.tensor(ids[:, :-1], dtype=torch.long)).logits.reshape(-1, 512)
    t = torch.tensor(ids[:, 1:].reshape(-1)[trained], dtype=torch.long)
    want = torch.nn.functional.cross_entropy(logits[torch.tensor(trained)], t)
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-4 * abs(want.item())
    peft_grads = {n.replace(".default", ""): p.grad.numpy() for n, p in
                  reference.named_parameters() if "lora_" in n}
    from mlx.utils import tree_flatten

    flat = dict(tree_flatten(grads))
    assert width == batch.inputs.shape[1]
    checked = 0
    for path, (a_key, b_key, target) in peft_keys(model).items():
        ga, gb = to_peft(target, flat[path + ".lora_a"], flat[path + ".lora_b"])
        for key, g in ((a_key, ga), (b_key, gb)):
            ref = peft_grads[key]
            err = np.linalg.norm(np.array(g) - ref) / np.linalg.norm(ref)
            assert err < 1e-4, (key, err)
            checked += 1
    assert checked == len(peft_grads) == 28


def test_rslora_and_layer_subset_round_trip(lora_checkpoint, tmp_path):
    from peft import PeftModel

    model = apply_lora(ours(lora_checkpoint), LoraConfig(
        rank=2, alpha=5, targets=("q_proj", "v_proj", "down_proj"), layers=(0,), use_rslora=True))
    for _, module in lora_modules(model):
        module.lora_b = mx.ones(module.lora_b.shape) * 0.2
    save_adapter(model, tmp_path)
    ids = tokens(4)
    got = np.array(model(mx.array(ids)))
    reference = PeftModel.from_pretrained(torch_base(lora_checkpoint), tmp_path)
    with torch.no_grad():
        want = reference(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    again = load_adapter(ours(lora_checkpoint), tmp_path)
    np.testing.assert_allclose(np.array(again(mx.array(ids))), got, rtol=1e-5, atol=1e-5)


def test_adapter_for_another_model_is_one_clear_error(lora_checkpoint, checkpoint_factory,
                                                      tmp_path):
    other = checkpoint_factory("lora_wider", seed=1, hidden_size=128, intermediate_size=32,
                               num_hidden_layers=2, vocab_size=512)
    model = apply_lora(ours(other), LoraConfig(rank=2, targets=("q_proj",)))
    save_adapter(model, tmp_path)
    with pytest.raises(AdapterError, match=r"layer 0 q_proj: adapter shapes .* do not fit"):
        load_adapter(ours(lora_checkpoint), tmp_path)
    with pytest.raises(AdapterError, match="not an adapter directory"):
        load_adapter(ours(lora_checkpoint), lora_checkpoint)


def test_peft_expert_nesting_whatever_the_config_order(lora_checkpoint, tmp_path):
    """PEFT nests expert wrappers in the module's parameter order, per layer: reversed
    `target_parameters`, and a layer with one expert parameter only, still load right."""
    from peft import LoraConfig as PeftConfig, get_peft_model

    torch.manual_seed(1)
    reference = get_peft_model(torch_base(lora_checkpoint), PeftConfig(
        r=2, lora_alpha=3, target_modules=["o_proj"], init_lora_weights=False,
        target_parameters=["mlp.experts.down_proj", "0.mlp.experts.gate_up_proj"]))
    reference.save_pretrained(tmp_path)
    ids = tokens(5)
    with torch.no_grad():
        want = reference(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    model = load_adapter(ours(lora_checkpoint), tmp_path)
    adapted = sorted(path for path, _ in lora_modules(model) if "experts" in path)
    assert adapted == ["model.layers.0.mlp.experts.down", "model.layers.0.mlp.experts.gate_up",
                       "model.layers.1.mlp.experts.down"]
    np.testing.assert_allclose(np.array(model(mx.array(ids))), want, rtol=1e-4, atol=1e-4)
    # ... and our own save writes the same keys.
    assert set(adapter_tensors(model)) == {
        n.replace(".default", "") for n, _ in reference.named_parameters() if "lora_" in n}
