"""LoRA on mixture-of-experts weights (transformers 5's fused 3-D experts), as PEFT's target_parameters.

Small configs (2 layers, hidden 32, 4 experts, top-2) of Mixtral, Qwen3-MoE, DeepSeek-V3 and gpt-oss.
References: the unadapted model, a hand computation of PEFT's per-expert update (``B_e A_e`` with A's rows
expert-major and B's columns rank-major), an eager copy of the model with that update written into its
3-D weights, PEFT itself (both checkpoint directions) and ONNX Runtime. Mixtral runs in CI; the sweep
over the other families is ``slow``.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import transformers
from adaptc.passes.experts import ExpertsNotQuantizedWarning

import adaptc
from adaptc.cli import main
from adaptc.errors import ConfigError, InputError, TargetError

_COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


def mixtral():
    return transformers.MixtralForCausalLM(
        transformers.MixtralConfig(
            intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2, **_COMMON
        )
    )


def qwen3_moe():
    return transformers.Qwen3MoeForCausalLM(
        transformers.Qwen3MoeConfig(
            intermediate_size=48,
            moe_intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            decoder_sparse_step=1,
            num_key_value_heads=2,
            **_COMMON,
        )
    )


def deepseek_v3():
    return transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(
            intermediate_size=48,
            moe_intermediate_size=24,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            **_COMMON,
        )
    )


def gpt_oss():
    return transformers.GptOssForCausalLM(
        transformers.GptOssConfig(
            intermediate_size=48,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            num_key_value_heads=2,
            **_COMMON,
        )
    )


# family -> (builder, the experts module's path in a MoE layer, its router's path, layers with experts)
FAMILIES = {
    "mixtral": (mixtral, "mlp.experts", "mlp.gate", (0, 1)),
    "qwen3-moe": (qwen3_moe, "mlp.experts", "mlp.gate", (0, 1)),
    "deepseek-v3": (deepseek_v3, "mlp.experts", "mlp.gate", (1,)),
    "gpt-oss": (gpt_oss, "mlp.experts", "mlp.router", (0, 1)),
}
CI_FAMILY = "mixtral"
ALL = [pytest.param(name, marks=() if name == CI_FAMILY else pytest.mark.slow) for name in FAMILIES]
WEIGHTS = ("gate_up_proj", "down_proj")


def build(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family][0]().eval()


def batch(seed: int, rows: int = 2, length: int = 7) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 96, (rows, length), generator=generator), "use_cache": False}


def logits(model, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits


@torch.no_grad()
def randomize(params) -> None:
    for _, p in params:
        p.normal_(std=0.2)


def expert_names(family: str) -> list[str]:
    _, experts, _, layers = FAMILIES[family]
    return [f"model.layers.{i}.{experts}.{w}" for i in layers for w in WEIGHTS]


def hand_delta(a: torch.Tensor, b: torch.Tensor, experts: int, r: int, scale: float, stored_in_out: bool):
    """PEFT's update, written out per expert: A's rows ``e*r .. e*r+r-1``, B's columns ``k*E + e``."""
    deltas = []
    for e in range(experts):
        a_e = a[e * r : (e + 1) * r]  # [r, in]
        b_e = b[:, [k * experts + e for k in range(r)]]  # [out, r]
        delta = scale * (b_e @ a_e)  # [out, in]
        deltas.append(delta.T if stored_in_out else delta)
    return torch.stack(deltas)


# --- sites ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ALL)
def test_expert_weights_are_sites_named_by_their_parameter(family):
    model = build(family)
    sites = {s.name: s for s in adaptc.inspect_sites(model, batch(0))}
    params = dict(model.named_parameters())
    found = [n for n, s in sites.items() if s.kind == "experts"]
    assert found == expert_names(family)
    for name in found:
        site, weight = sites[name], params[name]
        assert site.weight_shape == tuple(weight.shape) and site.experts == 4 == weight.shape[0]
        # gpt-oss stores each expert [in, out] (x @ W), the others [out, in] (linear(x, W)).
        stored_in_out = family == "gpt-oss"
        assert site.fan_in_fan_out is stored_in_out
        out_f, in_f = (
            (weight.shape[2], weight.shape[1]) if stored_in_out else (weight.shape[1], weight.shape[2])
        )
        assert (site.in_features, site.out_features) == (in_f, out_f)
        assert site.uses >= 1
    hidden, inter = 32, (48 if family in ("mixtral", "gpt-oss") else 24)
    gate_up = sites[expert_names(family)[0]]
    assert (gate_up.in_features, gate_up.out_features) == (hidden, 2 * inter)
    # The router is a site but not in all-linear (PEFT leaves it out too); the experts are.
    router = f"model.layers.{FAMILIES[family][3][-1]}.{FAMILIES[family][2]}"
    if (
        router in sites
    ):  # DeepSeek-V3's router casts its weight to fp32 first: not a weight the matcher follows
        assert sites[router].is_router
    am = adaptc.inject(model, "lora", example_inputs=batch(0), r=2)
    chosen = {s.name for s in am.sites}
    assert set(expert_names(family)) <= chosen and router not in chosen
    assert any(n.endswith("self_attn.o_proj") for n in chosen) and "lm_head" not in chosen


@pytest.mark.parametrize("family", ALL)
def test_lora_on_experts_is_peft_update_per_expert_and_merges_exactly(family):
    model = build(family)
    pristine = copy.deepcopy(model)
    inputs, other = batch(1), batch(2, rows=3, length=5)
    am = adaptc.inject(
        model, "lora", example_inputs=inputs, targets=None, target_parameters=list(WEIGHTS), r=2, alpha=6
    )
    assert [s.name for s in am.sites] == expert_names(family)
    torch.testing.assert_close(logits(am, inputs), logits(pristine, inputs), atol=0, rtol=0)  # B = 0 at init
    randomize(am.adapters.named_parameters())

    # Independent reference: the base model with the hand-computed update written into its 3-D weights.
    reference = copy.deepcopy(pristine)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for site in am.sites:
            layer = am.adapters["default"][site.name.replace(".", "__")]
            assert tuple(layer.lora_A.shape) == (2 * 4, site.in_features)  # PEFT's shapes
            assert tuple(layer.lora_B.shape) == (site.out_features, 2 * 4)
            params[site.name] += hand_delta(layer.lora_A, layer.lora_B, 4, 2, 3.0, site.fan_in_fan_out)
    for x in (inputs, other):  # another batch size and length: the captured graph is not specialised
        torch.testing.assert_close(logits(am, x), logits(reference, x), atol=1e-5, rtol=0)

    expected = logits(am, other)
    merged = am.merge()
    torch.testing.assert_close(logits(merged, other), expected, atol=1e-5, rtol=0)
    for site_name in expert_names(family):
        torch.testing.assert_close(merged.get_parameter(site_name), params[site_name], atol=1e-6, rtol=0)


def _router_choices(model: torch.nn.Module, family: str, inputs: dict) -> list[torch.Tensor]:
    """Each MoE layer's top-k expert ids for every token, read from the router module's own output."""
    _, _, router_path, layers = FAMILIES[family]
    picks, hooks = [], []
    for i in layers:
        router = model.get_submodule(f"model.layers.{i}.{router_path}")
        hooks.append(router.register_forward_hook(lambda m, args, out: picks.append(_topk(out))))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return picks


def _topk(out) -> torch.Tensor:
    """The router's expert ids: the integer tensor among its outputs."""
    tensors = out if isinstance(out, tuple) else (out,)
    return next(t for t in tensors if not t.is_floating_point()).sort(-1).values


@pytest.mark.parametrize("family", ALL)
def test_routing_stays_dynamic(family):
    """The captured graph routes each input anew: batches that pick other experts still match the base model
    at init, and the merged model after training."""
    model = build(family)
    pristine = copy.deepcopy(model)
    first, second = batch(3), batch(4, rows=3, length=9)
    picks = [_router_choices(pristine, family, x) for x in (first, second)]
    # The two batches route differently: another set of experts is hit in some layer.
    assert any(
        set(a.unique().tolist()) != set(b.unique().tolist()) or a.shape != b.shape for a, b in zip(*picks)
    )
    assert any(len(p.unique()) > 1 for p in picks[1])  # several experts in one batch: a real per-token choice

    am = adaptc.inject(model, "lora", example_inputs=first, r=2, alpha=4)
    for x in (first, second):
        torch.testing.assert_close(logits(am, x), logits(pristine, x), atol=1e-6, rtol=0)

    am.train()
    optimizer = torch.optim.AdamW(am.adapter_parameters(), lr=0.05)
    for step in range(3):
        x = batch(10 + step)
        loss = am(**x, labels=x["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    am.eval()
    layer = am.adapters["default"][expert_names(family)[0].replace(".", "__")]
    assert layer.lora_B.abs().sum() > 0  # the experts' adapters trained
    expected = [logits(am, x) for x in (first, second)]
    assert not torch.allclose(expected[1], logits(pristine, second), atol=1e-4)
    merged = am.merge()
    for x, want in zip((first, second), expected):
        torch.testing.assert_close(logits(merged, x), want, atol=1e-5, rtol=0)


# --- options -------------------------------------------------------------------------------------


def test_target_parameters_peft_spelling_and_clear_errors():
    model = build(CI_FAMILY)
    inputs = batch(0)
    for bad, match in (
        (dict(dropout=0.1), r"mixture-of-experts weights.*dropout=0.1"),
        (dict(use_dora=True), "use_dora=True"),
        (dict(init="pissa"), "init='pissa'"),
    ):
        with pytest.raises(ConfigError, match=match):
            adaptc.inject(model, "lora", example_inputs=inputs, **bad)
    with pytest.raises(TargetError, match="names no mixture-of-experts weight"):
        adaptc.inject(
            model, "lora", example_inputs=inputs, target_modules=["q_proj"], target_parameters=["q_proj"]
        )
    with pytest.raises(ConfigError, match="target_parameters must be a non-empty list"):
        adaptc.LoraConfig.from_options(target_parameters="mlp.experts.gate_up_proj")
    # The model is untouched by the refusals: nothing was injected.
    assert not any(name.startswith("_adaptc") for name, _ in model.named_modules())

    am = adaptc.inject(
        model,
        "lora",
        example_inputs=inputs,
        target_modules=None,
        target_parameters=["mlp.experts.gate_up_proj"],
        r=2,
    )
    assert [s.name for s in am.sites] == [n for n in expert_names(CI_FAMILY) if n.endswith("gate_up_proj")]
    am.add_adapter("both", target_modules=["q_proj"], target_parameters=["down_proj"], r=2)
    assert {s.name.rsplit(".", 1)[1] for s in am.adapter_sites("both")} == {"q_proj", "down_proj"}
    # A mixed-adapter batch cannot apply a weight update to some rows only: refused, as in PEFT.
    with pytest.raises(InputError, match="mixture-of-experts"):
        am(**inputs, adapter_names=["both", "__base__"])
    randomize(am.adapters["both"].named_parameters())
    am.delete_adapter("both")  # its weight updates leave every graph
    am.set_adapter("default")
    torch.testing.assert_close(logits(am, inputs), logits(model, inputs), atol=0, rtol=0)


def test_qlora_says_experts_stay_full_precision():
    model = build(CI_FAMILY)
    pristine = copy.deepcopy(model)
    inputs = batch(0)
    with pytest.warns(ExpertsNotQuantizedWarning, match="full precision"):
        am = adaptc.inject(model, "lora", example_inputs=inputs, quantize="nf4", r=2)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"  # the linears are quantized
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    assert {s.name for s in am.sites} >= set(expert_names(CI_FAMILY))
    randomize(am.adapters.named_parameters())
    out = logits(am, inputs)
    assert torch.isfinite(out).all() and not torch.allclose(out, logits(pristine, inputs), atol=1e-3)


# --- inspect ------------------------------------------------------------------------------------

MODEL_FILE = """
import torch, transformers

def build_model():
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)).eval()

def example_inputs():
    return {"input_ids": torch.randint(0, 96, (2, 7)), "use_cache": False}
"""


def test_inspect_lists_each_expert_tensor_with_its_expert_count(tmp_path, capsys):
    path = tmp_path / "moe.py"
    path.write_text(MODEL_FILE)
    plot = tmp_path / "sites.png"
    assert main(["inspect", str(path), "--r", "2", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("model.")}
    for name in expert_names(CI_FAMILY):
        row = rows[name]
        assert row[1:3] == ["experts", "x4"], row
        shape = "4x96x32" if name.endswith("gate_up_proj") else "4x32x48"
        assert shape in row
        in_f, out_f = (32, 96) if name.endswith("gate_up_proj") else (48, 32)
        assert f"{in_f}->{out_f}" in row
        assert f"{2 * 4 * (in_f + out_f):,}" in row  # r * experts * (in + out): PEFT's parameter count
    assert sum(1 for line in out.splitlines() if " experts x4 " in line) == 4  # one line per expert tensor
    assert all("router" in rows[f"model.layers.{i}.mlp.gate"] for i in (0, 1))  # left out of all-linear
    assert "gate_up_proj: 2 weights of 4 experts" in out and "down_proj: 2 weights of 4 experts" in out
    assert plot.stat().st_size > 0


# --- PEFT checkpoints and ONNX -------------------------------------------------------------------

PEFT_ALL = [
    pytest.param(name, marks=[pytest.mark.integration] + ([] if name == CI_FAMILY else [pytest.mark.slow]))
    for name in FAMILIES
]


@pytest.mark.parametrize("family", PEFT_ALL)
def test_peft_target_parameters_adapter_loads_into_adaptc(family, tmp_path):
    peft = pytest.importorskip("peft")
    model = build(family)
    pristine = copy.deepcopy(model)
    inputs = batch(5)
    config = peft.LoraConfig(
        r=2,
        lora_alpha=5,
        target_modules=["q_proj" if family != "deepseek-v3" else "o_proj"],
        target_parameters=[f"{FAMILIES[family][1]}.{w}" for w in WEIGHTS],
    )
    peft_model = peft.get_peft_model(model, config).eval()
    randomize((n, p) for n, p in peft_model.named_parameters() if "lora_" in n)
    expected = logits(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)

    am = adaptc.load_adapter(pristine, tmp_path, example_inputs=inputs)
    assert set(expert_names(family)) <= {s.name for s in am.sites}
    torch.testing.assert_close(logits(am, inputs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", PEFT_ALL)
def test_adaptc_expert_adapter_loads_into_peft(family, tmp_path):
    peft = pytest.importorskip("peft")
    model = build(family)
    pristine = copy.deepcopy(model)
    inputs = batch(6)
    # Not the dense MLP's or shared experts' down_proj (DeepSeek-V3): PEFT reads those names as the experts'.
    am = adaptc.inject(
        model,
        "lora",
        example_inputs=inputs,
        targets=["o_proj"],
        target_parameters=list(WEIGHTS),
        r=2,
        alpha=3,
        rank_pattern={"down_proj": 3},
    )
    randomize(am.adapters.named_parameters())
    expected = logits(am, inputs)
    am.save_adapter(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_parameters"] == expert_names(family)
    assert saved["fan_in_fan_out"] is False  # PEFT refuses it with target_parameters
    assert saved["target_modules"] == [s.name for s in am.sites if s.kind != "experts"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(pristine, tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, inputs), expected, atol=1e-5, rtol=0)
    # and back: adaptc reads its own file again
    again = adaptc.load_adapter(copy.deepcopy(am.base_model), tmp_path, example_inputs=inputs)
    torch.testing.assert_close(logits(again, inputs), expected, atol=1e-5, rtol=0)


@pytest.mark.integration
@pytest.mark.parametrize(
    "family", [pytest.param(n, marks=() if n == CI_FAMILY else pytest.mark.slow) for n in FAMILIES]
)
def test_onnx_export_of_lora_on_experts_matches_the_adapted_model(family, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = build(family)
    inputs = batch(7)
    am = adaptc.inject(model, "lora", example_inputs=inputs, r=2)
    randomize(am.adapters.named_parameters())
    adaptc.export_onnx(am, tmp_path / "moe.onnx", latency_runs=1)

    other = batch(8, rows=3, length=6)  # another batch and length: other routing, same graph
    session = ort.InferenceSession(str(tmp_path / "moe.onnx"))
    names = [i.name for i in session.get_inputs()]
    feed = {name: other[name].numpy() for name in names if name in other}
    if "attention_mask" in names:
        feed["attention_mask"] = torch.ones_like(other["input_ids"]).numpy()
    got = torch.from_numpy(session.run(None, feed)[0])
    torch.testing.assert_close(got, logits(am, other).detach(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", [CI_FAMILY, pytest.param("gpt-oss", marks=pytest.mark.slow)])
def test_batched_mm_experts_are_matched_too(family):
    """transformers' other capturable implementation: bmm on the weight indexed by each token's expert
    (Mixtral: W[ids] @ x, gpt-oss: x @ W[ids])."""
    model = build(family)
    model.set_experts_implementation("batched_mm")
    pristine = copy.deepcopy(model)
    inputs = batch(1)
    am = adaptc.inject(
        model, "lora", example_inputs=inputs, targets=None, target_parameters=list(WEIGHTS), r=2
    )
    assert [(s.name, s.op) for s in am.sites] == [(n, "aten.bmm") for n in expert_names(family)]
    randomize(am.adapters.named_parameters())
    reference = copy.deepcopy(pristine)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for site in am.sites:
            layer = am.adapters["default"][site.name.replace(".", "__")]
            params[site.name] += hand_delta(layer.lora_A, layer.lora_B, 4, 2, 4.0, site.fan_in_fan_out)
    other = batch(2, rows=3, length=5)
    torch.testing.assert_close(logits(am, other), logits(reference, other), atol=1e-5, rtol=0)
