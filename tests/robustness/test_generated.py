"""Generated configs and selectors (hypothesis): every input gets a result or a clear adaptc error.

- Option dicts for each method, drawn from valid and invalid values (wrong types, 0, negatives,
  huge numbers, NaN/inf, empty strings, unknown names): building the config either succeeds or
  raises ConfigError; nothing else escapes. LoRA ones that validate are injected into a real model,
  which is unchanged when inject refuses.
- Target selectors (regex strings, name lists) against the sites of a real GPT-2: a string that is
  not a valid regex is refused with ConfigError; a valid one selects exactly the sites Python's
  ``re.fullmatch`` picks (an independent reference), minus ``exclude``; an empty selection is a
  TargetError naming the sites there are.
- The command line with generated --targets: exit 0, or one line `adaptc: error: ...`.
"""

from __future__ import annotations

import re

import pytest
import torch
from adaptc.passes.selection import compile_selector, select
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_zoo import load_example
from robust_helpers import TINY, M, assert_model_unchanged, model_snapshot

import adaptc
from adaptc.cli import main
from adaptc.methods import make_config

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])

ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([10**9, -(10**9), 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.lists(st.text(max_size=4), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-2, 4), max_size=2),
)
LORA_KEYS = ["r", "alpha", "dropout", "targets", "exclude", "layers", "layers_pattern", "rslora", "use_dora", "init",
             "rank_pattern", "alpha_pattern", "lora_alpha", "target_modules", "bogus_option"]
PROMPT_KEYS = ["num_virtual_tokens", "init", "encoder", "encoder_hidden_size", "encoder_num_layers", "prefix_projection",
               "shift_positions", "token_dim", "bogus_option"]


def _options(keys: list[str]):
    return st.dictionaries(st.sampled_from(keys), ODD, max_size=3)


@settings(max_examples=150, **SETTINGS)
@given(method=st.sampled_from(["lora", "prompt", "ptuning", "prefix"]), lora=_options(LORA_KEYS),
       prompt=_options(PROMPT_KEYS))
def test_configs_validate_or_raise_config_error(method, lora, prompt):
    options = lora if method == "lora" else prompt
    try:
        config = make_config(method, dict(options))
    except adaptc.ConfigError as exc:
        assert str(exc)  # a message, not an empty error
        return
    assert config.method == method


@pytest.fixture(scope="module")
def mlp_inputs():
    return M.example_inputs()


@settings(max_examples=20, **SETTINGS)
@given(options=_options(["r", "alpha", "dropout", "targets", "exclude", "layers", "rank_pattern"]))
def test_generated_lora_injects_or_leaves_the_model_unchanged(options, mlp_inputs):
    model = M.build_model()
    before = model_snapshot(model)
    try:
        am = adaptc.inject(model, "lora", example_inputs=mlp_inputs, **options)
    except adaptc.AdaptcError as exc:
        assert str(exc)
        assert_model_unchanged(model, before)
        return
    assert am.sites and all(not p.requires_grad for p in model.parameters())
    with torch.no_grad():  # B = 0 at init: the base model's output
        assert torch.equal(am.eval()(**mlp_inputs), model.eval()(**mlp_inputs))


# --- selectors against a real model's sites ----------------------------------------------------

def _gpt2_sites():
    module = load_example("tiny_gpt2", "tiny_gpt2_for_selectors")
    return adaptc.inspect_sites(module.build_model(), module.example_inputs())


SITES = []


@pytest.fixture(scope="module")
def sites():
    if not SITES:
        SITES.extend(_gpt2_sites())
    return SITES


REGEX = st.text(alphabet="atnchpm_01.*+?()[]|\\^${}-", min_size=0, max_size=12)
NAMES = st.lists(st.sampled_from(["c_attn", "attn.c_proj", "c_fc", "h.0.mlp.c_proj", "wte", "lm_head", "q_proj", ""]),
                 min_size=0, max_size=3)


def _reference(selector, name: str) -> bool:
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == n or name.endswith("." + n) for n in selector)


def _valid(selector) -> bool:
    if isinstance(selector, str):
        if not selector:
            return False
        try:
            re.compile(selector)
        except re.error:
            return False
        return True
    return bool(selector) and all(selector)


@settings(max_examples=200, **SETTINGS)
@given(targets=st.one_of(REGEX, NAMES), exclude=st.one_of(st.none(), REGEX, NAMES))
def test_selectors_pick_what_fullmatch_picks(targets, exclude, sites):
    valid = _valid(targets) and (exclude is None or _valid(exclude))
    try:
        t = compile_selector(targets, "targets")
        e = compile_selector(exclude, "exclude")
    except adaptc.ConfigError as exc:
        assert not valid, f"refused a valid selector: {exc}"
        assert ("regular expression" in str(exc)) or ("empty" in str(exc)) or ("non-empty" in str(exc))
        return
    assert valid, f"accepted an invalid selector {targets!r} / {exclude!r}"
    expected = [s.name for s in sites if _reference(targets, s.name) and not (exclude and _reference(exclude, s.name))]
    try:
        chosen = [s.name for s in select(sites, t, e)]
    except adaptc.TargetError as exc:
        assert expected == [], f"refused, but fullmatch picks {expected}"
        assert "matched no site" in str(exc) and "adaptc inspect" in str(exc)
        return
    assert chosen == expected


@settings(max_examples=6, **SETTINGS)
@given(targets=st.one_of(REGEX.filter(lambda s: not s.startswith("-")), st.just("fc.*")))
def test_cli_with_generated_targets_is_ok_or_one_line(targets, capsys):
    rc = main(["inject", str(TINY), "--r", "2", "--targets", targets])
    captured = capsys.readouterr()
    if rc == 0:
        assert "trainable params" in captured.out
        return
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaptc: error: "), captured.err
    assert "Traceback" not in captured.err

