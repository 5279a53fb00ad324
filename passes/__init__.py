"""Rewrite passes over captured graphs (installed as ``adaptc.passes``).

What each module is, so a reader sees which is which:

- the pass interface and the order: ``manager`` (GraphPass, PassResult, PassManager);
- analyses (they read graphs, change nothing): ``sites``, ``selection``, ``sequence``, ``attention``
  (matching; its ``canonicalize`` is also a rewrite, run by prefix tuning);
- graph rewrites: ``wrap`` (route a weight's uses through a module), ``lora``, ``lora_fused`` (sibling
  groups, absorb), ``prefix``, ``narrow``, ``speedups``,
  ``chunked_loss`` (the LM head and its loss over chunks of tokens), ``checkpoint`` (activation
  checkpointing: the repeated blocks recomputed in the backward);
- capture-time edits (hooks installed while a model is captured again): ``prompt``; ``prefix``'s
  position shift;
- model-level replacement before capture: ``quantize`` (QLoRA);
- runtime kernels the rewritten graphs call: ``dropout_mask``; ``lora_fused``'s autograd Functions;
- adapter arithmetic: ``weighted`` (combining LoRA adapters).
"""
