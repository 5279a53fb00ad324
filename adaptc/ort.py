"""Generate with an exported decoder folder (``export_onnx(am, folder, task="text-generation")``).

Two engines run the same folder:

- ``"genai"``: onnxruntime-genai (``onnxruntime_genai.Model(folder)``), its adapters switched per
  request with ``Generator.set_active_adapter``. Prompts of one batch must have the same length.
- ``"session"``: a plain ``onnxruntime.InferenceSession`` loop that feeds the presents back as the
  next step's past, the adapter applied with ``RunOptions.add_active_adapter``. Takes an
  ``attention_mask`` for left-padded prompts.

``"auto"`` (the default) is onnxruntime-genai when it is installed, else the session loop.
A folder exported with ``mixed_adapters=True`` (every adapter stacked in the graph, an
``adapter_index`` input) takes one adapter per row: ``adapter=["a", None, "b"]`` (None: the base
model). Both engines run it: onnxruntime-genai is given the rows' indices with
``Generator.set_model_input("adapter_index", ...)``, the session loop feeds them at every step.
Greedy by default; ``do_sample=True`` samples with ``temperature``, ``top_k`` and ``top_p``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

ENGINES = ("auto", "genai", "session")
CONFIG_FILE = "genai_config.json"
MIXED_FILE = "mixed_adapters.json"  # targets/onnx_decoder.py writes it: adapter_index value -> adapter


def genai_available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


class OrtGenerator:
    """An exported decoder folder, opened once: ``generate`` as often as needed, any adapter per call."""

    def __init__(self, folder: str | os.PathLike, engine: str = "auto", threads: int | None = None) -> None:
        if engine not in ENGINES:
            raise InputError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}")
        self.folder = Path(folder)
        config_path = self.folder / CONFIG_FILE
        if not config_path.is_file():
            raise InputError(f"{self.folder} has no {CONFIG_FILE}: export it with "
                             "adaptc.export_onnx(am, folder, task='text-generation')")
        self.config = json.loads(config_path.read_text())
        model = self.config["model"]
        self.context_length = int(model["context_length"])
        eos = model.get("eos_token_id", -1)
        self.eos_token_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if int(e) >= 0}
        self.pad_token_id = int(model.get("pad_token_id", 0))
        self.adapter_files = {p.name[: -len(".onnx_adapter")]: p for p in sorted(self.folder.glob("*.onnx_adapter"))}
        mixed = self.folder / MIXED_FILE
        self.mixed: list[str] = json.loads(mixed.read_text())["adapter_index"] if mixed.is_file() else []
        if engine == "auto":
            engine = "genai" if genai_available() else "session"
        if engine == "genai" and not genai_available():
            raise InputError("engine='genai' needs onnxruntime-genai: pip install onnxruntime-genai")
        self.engine = engine
        self._threads = threads
        self._session: Any = None
        self._loaded: dict[str, Any] = {}  # adapter -> ort.LoraAdapter, or the onnxruntime_genai.Adapters
        self._genai_model: Any = None
        self._genai_adapters: Any = None

    @property
    def adapters(self) -> list[str]:
        return list(self.mixed or self.adapter_files)

    def generate(
        self,
        prompt_ids: Any,
        *,
        adapter: str | list[str | None] | None = None,
        max_new_tokens: int = 32,
        attention_mask: Any = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> np.ndarray:
        """The prompts with up to ``max_new_tokens`` new tokens each, ``[batch, prompt + new]`` (int64);
        rows that ended (EOS) are padded with the pad token, and generation stops once all have."""
        ids = _prompt(prompt_ids)
        mask = None if attention_mask is None else _mask(attention_mask, ids.shape)
        self._check(ids, adapter, max_new_tokens, temperature, top_k, top_p)
        if self.engine == "genai":
            if mask is not None and not mask.all():
                raise InputError("engine='genai' takes prompts of one length (no padding); use engine='session' "
                                 "for left-padded prompts with an attention_mask")
            return self._genai(ids, adapter, max_new_tokens, do_sample, temperature, top_k, top_p, seed)
        return self._session_loop(ids, mask, adapter, max_new_tokens, do_sample, temperature, top_k, top_p, seed)

    # --- checks ---

    def _check(self, ids: np.ndarray, adapter: Any, new: int, temperature: float, top_k: int,
               top_p: float) -> None:
        rows = adapter if isinstance(adapter, (list, tuple)) else [adapter]
        if isinstance(adapter, (list, tuple)) and (not self.mixed or len(adapter) != ids.shape[0]):
            raise InputError(f"one adapter per row ({len(adapter)} given for {ids.shape[0]} rows) needs a folder "
                             "exported with mixed_adapters=True and one name (or None) per prompt row")
        have = self.adapters
        for name in rows:
            if name is not None and name not in have:
                listed = ", ".join(map(repr, have)) or "none (a merged export)"
                raise InputError(f"unknown adapter {name!r}: {self.folder} holds {listed}; pass one of them, or "
                                 "adapter=None for the base model")
        if isinstance(new, bool) or not isinstance(new, int) or new < 0:
            raise InputError(f"max_new_tokens must be a non-negative integer, got {new!r}")
        if ids.shape[1] + new > self.context_length:
            raise InputError(f"prompt ({ids.shape[1]}) + max_new_tokens ({new}) exceeds the folder's context length "
                             f"{self.context_length}; ask for fewer tokens")
        vocab = int(self.config["model"]["vocab_size"])
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise InputError(f"prompt_ids must be token ids in [0, {vocab}), got {ids.min()}..{ids.max()}")
        if not temperature > 0 or not 0 < top_p <= 1 or top_k < 0:
            raise InputError(f"need temperature > 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")

    # --- the plain session loop ---

    def _open_session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            if self._threads:
                options.intra_op_num_threads = self._threads
            decoder = self.config["model"]["decoder"]["filename"]
            self._session = ort.InferenceSession(str(self.folder / decoder), options, providers=["CPUExecutionProvider"])
        return self._session

    def _run_options(self, adapter: Any) -> Any:
        import onnxruntime as ort

        options = ort.RunOptions()
        if adapter is not None and not self.mixed:
            if adapter not in self._loaded:
                lora = ort.LoraAdapter()
                lora.Load(str(self.adapter_files[adapter]))
                self._loaded[adapter] = lora
            options.add_active_adapter(self._loaded[adapter])
        return options

    def _index(self, adapter: Any, batch: int) -> dict[str, np.ndarray]:
        """A stacked folder's adapter_index feed: each row's adapter, -1 for the base model."""
        if not self.mixed:
            return {}
        rows = adapter if isinstance(adapter, (list, tuple)) else [adapter] * batch
        return {"adapter_index": np.array([-1 if n is None else self.mixed.index(n) for n in rows], np.int64)}

    def _session_loop(self, ids: np.ndarray, mask: np.ndarray | None, adapter: Any, new_tokens: int,
                      do_sample: bool, temperature: float, top_k: int, top_p: float, seed: int | None) -> np.ndarray:
        from adaptc.targets.decoder_loop import empty_past, presents_as_past, step_feeds

        session = self._open_session()
        options = self._run_options(adapter)
        index = self._index(adapter, ids.shape[0])
        names = {v.name for v in session.get_inputs()}
        outs = [o.name for o in session.get_outputs()]
        rng = np.random.default_rng(seed)
        mask = np.ones(ids.shape, np.int64) if mask is None else mask
        past = empty_past(session, ids.shape[0])
        sequences, step_ids = ids, ids
        done = np.zeros(ids.shape[0], bool)
        for _ in range(new_tokens):
            result = dict(zip(outs, session.run(None, {**step_feeds(names, step_ids, mask, past), **index}, options)))
            logits = result["logits"][:, -1].astype(np.float64)
            token = _sample(logits, rng, temperature, top_k, top_p) if do_sample else logits.argmax(-1)
            token = np.where(done, self.pad_token_id, token)
            done |= np.isin(token, list(self.eos_token_ids))
            step_ids = token[:, None].astype(np.int64)
            sequences = np.concatenate([sequences, step_ids], axis=1)
            mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)
            past = presents_as_past(result)
            if done.all():
                break
        return sequences

    # --- onnxruntime-genai ---

    def _genai(self, ids: np.ndarray, adapter: Any, new_tokens: int, do_sample: bool, temperature: float,
               top_k: int, top_p: float, seed: int | None) -> np.ndarray:
        import onnxruntime_genai as og

        if self._genai_model is None:
            self._genai_model = og.Model(str(self.folder))
        index = self._index(adapter, ids.shape[0])  # a stacked folder: the rows' adapters, an input of the graph
        if index:
            adapter = None
        if adapter is not None and adapter not in self._loaded:
            if self._genai_adapters is None:
                self._genai_adapters = og.Adapters(self._genai_model)
            self._genai_adapters.load(str(self.adapter_files[adapter]), adapter)
            self._loaded[adapter] = self._genai_adapters
        if new_tokens == 0:
            return ids
        params = og.GeneratorParams(self._genai_model)
        search: dict[str, Any] = {"max_length": ids.shape[1] + new_tokens, "batch_size": ids.shape[0],
                                  "do_sample": do_sample}
        if do_sample:
            search.update(temperature=temperature, top_k=top_k or int(self.config["model"]["vocab_size"]), top_p=top_p)
            if seed is not None:
                search["random_seed"] = seed
        params.set_search_options(**search)
        generator = og.Generator(self._genai_model, params)
        for name, value in index.items():
            generator.set_model_input(name, value)
        if adapter is not None:
            generator.set_active_adapter(self._genai_adapters, adapter)
        generator.append_tokens(ids.astype(np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        rows = [np.asarray(generator.get_sequence(i), np.int64) for i in range(ids.shape[0])]
        width = max(len(r) for r in rows)
        return np.stack([np.pad(r, (0, width - len(r)), constant_values=self.pad_token_id) for r in rows])


def _prompt(prompt_ids: Any) -> np.ndarray:
    ids = np.asarray(prompt_ids.detach().cpu() if hasattr(prompt_ids, "detach") else prompt_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"prompt_ids must be integer token ids shaped [batch, length] (length >= 1), got "
                         f"{ids.dtype} {tuple(ids.shape)}")
    return ids.astype(np.int64)


def _mask(attention_mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(attention_mask.detach().cpu() if hasattr(attention_mask, "detach") else attention_mask)
    if mask.shape != shape:
        raise InputError(f"attention_mask {tuple(mask.shape)} must match prompt_ids {tuple(shape)}")
    return mask.astype(np.int64)


def _sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    logits = logits / temperature
    if top_k:
        kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        keep = np.cumsum(sorted_probs, -1) - sorted_probs < top_p  # the smallest set reaching top_p
        cut = np.zeros_like(probs)
        np.put_along_axis(cut, order, np.where(keep, sorted_probs, 0.0), -1)
        probs = cut / cut.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])


def generate(
    folder: str | os.PathLike,
    prompt_ids: Any,
    *,
    adapter: str | list[str | None] | None = None,
    max_new_tokens: int = 32,
    engine: str = "auto",
    **options: Any,
) -> np.ndarray:
    """Generate from an exported decoder folder: ``[batch, prompt + new]`` token ids.

    ``adapter``: the name of one of the folder's ``<name>.onnx_adapter`` files (an unmerged export), or
    None for the model as exported; for a ``mixed_adapters=True`` folder, one name (or None) per row. ``options``: ``attention_mask``, ``do_sample``, ``temperature``,
    ``top_k``, ``top_p``, ``seed`` (see :meth:`OrtGenerator.generate`). Opens the folder each call: keep
    an :class:`OrtGenerator` to serve many requests.
    """
    return OrtGenerator(folder, engine).generate(prompt_ids, adapter=adapter, max_new_tokens=max_new_tokens, **options)
