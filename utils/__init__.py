"""LLaMA-2 from scratch: the finished, tested version of every component the lessons build.

One module per concept, in lesson order: rope, norm, attention (GQA + KV cache), feedforward
(SwiGLU), model, generate, then tokenizer, data, train, checkpoints, plotting.
"""
