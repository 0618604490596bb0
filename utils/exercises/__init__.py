"""Exercise checkers: run a learner's version of a lesson's key function and name the likely mistake.

Each `check_*` takes a candidate (a function, or a class with the same signature and parameter names
as the `utils` version), runs it on small seeded inputs of several shapes against the `utils`
reference (and an independent one where there is one), and returns None when it agrees. Otherwise it
raises AssertionError saying what is wrong: it computes what the usual wrong versions (rotate-half
RoPE, tiled K/V heads, LayerNorm instead of RMSNorm, ...) would have returned and names the one the
candidate matches. A stub (raises NotImplementedError, returns None or `...`) raises `NotAttempted`.

Notebooks call `run_check(check_rope, my_rope)`: it prints and returns "✅ passed", "⏳ not attempted
yet" or "❌ <what is wrong>" and never raises, so an exercise never stops a notebook. A finished candidate
that calls another exercise's stub gets "⏳ Attention calls repeat_kv, which is not attempted yet: do
exercise 1 (repeat_kv) first". Two listed mistakes made at once are named together.

One module per lesson, in lesson order; a later lesson's checkers import an earlier one's helpers:
    checking    NotAttempted, run_check, and the helpers every checker shares (call, compare, diagnose)
    lesson_01   RoPE: the cos/sin tables, the rotation, HF -> Meta permutation
    lesson_02   grouped-query attention: repeat_kv, the causal mask, the attention forward
    lesson_03   the KV cache, and the attention forward that uses it
    lesson_04   SwiGLU's hidden size, the feed-forward, RMSNorm, the block
    lesson_05   the full model, its parameter count, its KV cache in bytes
    lesson_06   cross-entropy, batches, the learning-rate schedule, sampling
    lesson_07   LoRA: the adapted layer, merging it, counting what it trains
    lesson_08   Llama 3: the scaled RoPE frequency ladder, the chat prompt, the vocabulary's parameters

Besides the checkers, the package re-exports (`name as name`) what the tests replay: each checker's own
list of mistakes, its hints and inputs.
"""

from .checking import NotAttempted, run_check
from .lesson_01 import ROPE_HINT as ROPE_HINT
from .lesson_01 import _cos_sin_mistakes as _cos_sin_mistakes
from .lesson_01 import _frequency_mistakes as _frequency_mistakes
from .lesson_01 import _permute_mistakes as _permute_mistakes
from .lesson_01 import _rope_mistakes as _rope_mistakes
from .lesson_01 import check_permute_hf_to_meta, check_rope, check_rope_cos_sin, check_rope_frequencies
from .lesson_02 import _attention_mistakes as _attention_mistakes
from .lesson_02 import _mask_mistakes as _mask_mistakes
from .lesson_02 import _repeat_kv_mistakes as _repeat_kv_mistakes
from .lesson_02 import check_attention, check_causal_mask, check_repeat_kv
from .lesson_03 import CACHED_CHUNKS as CACHED_CHUNKS
from .lesson_03 import _cache_mistakes as _cache_mistakes
from .lesson_03 import _cached_attention_mistakes as _cached_attention_mistakes
from .lesson_03 import check_cached_attention, check_kv_cache
from .lesson_04 import _block_mistakes as _block_mistakes
from .lesson_04 import _feed_forward_mistakes as _feed_forward_mistakes
from .lesson_04 import _rmsnorm_mistakes as _rmsnorm_mistakes
from .lesson_04 import _swiglu_mistakes as _swiglu_mistakes
from .lesson_04 import _swiglu_rule as _swiglu_rule
from .lesson_04 import check_block, check_feed_forward, check_rmsnorm, check_swiglu_hidden_dim
from .lesson_05 import _count_configs as _count_configs
from .lesson_05 import _count_mistakes as _count_mistakes
from .lesson_05 import _kv_cases as _kv_cases
from .lesson_05 import _kv_mistakes as _kv_mistakes
from .lesson_05 import _llama as _llama
from .lesson_05 import _llama_cache_mistakes as _llama_cache_mistakes
from .lesson_05 import _llama_configs as _llama_configs
from .lesson_05 import _llama_mistakes as _llama_mistakes
from .lesson_05 import check_count_params, check_kv_cache_bytes, check_llama
from .lesson_06 import _sampling_mistakes as _sampling_mistakes
from .lesson_06 import check_batch, check_cross_entropy_loss, check_lr_schedule, check_sample_next
from .lesson_07 import check_lora_linear, check_lora_params, check_merge_lora
from .lesson_08 import _chat_mistakes as _chat_mistakes
from .lesson_08 import _scaling_mistakes as _scaling_mistakes
from .lesson_08 import _vocab_mistakes as _vocab_mistakes
from .lesson_08 import check_llama3_chat_prompt, check_scale_frequencies, check_vocab_params

__all__ = [
    "NotAttempted", "run_check",
    "check_rope_cos_sin", "check_rope", "check_permute_hf_to_meta", "check_rope_frequencies",
    "check_repeat_kv", "check_causal_mask", "check_attention",
    "check_kv_cache", "check_cached_attention",
    "check_feed_forward", "check_swiglu_hidden_dim", "check_rmsnorm", "check_block",
    "check_llama", "check_count_params", "check_kv_cache_bytes",
    "check_cross_entropy_loss", "check_batch", "check_lr_schedule", "check_sample_next",
    "check_lora_linear", "check_merge_lora", "check_lora_params",
    "check_scale_frequencies", "check_llama3_chat_prompt", "check_vocab_params",
]
