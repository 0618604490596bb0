"""LLaMA-2 from scratch: the finished, tested version of every component the lessons build.

The model, in lesson order:
    rope         rotary position embeddings: Meta's adjacent pairs, HF's rotate-half, the permutation between (01);
                 Llama 3.1's scaling of the frequency ladder (08)
    attention    grouped-query attention (MHA, GQA, MQA) and the preallocated KV cache (02, 03)
    feedforward  SwiGLU and Meta's hidden-size rule (04)
    norm         RMSNorm (04)
    model        LlamaConfig, TransformerBlock, Llama; presets (Llama 2 and 3.x) and parameter counts (05, 08)
    generate     greedy, temperature, top-k, top-p sampling, with or without the cache (03, 06)
    decode       speed: the decode step with fixed shapes, compiled (generate(..., compile=True), --compile)
    quantize     speed: int8 weights, one scale per output channel, torch's int8 kernel (--quantize int8)

Training your own (06):
    tokenizer    char, a byte-level BPE trained on your text, tiktoken's encodings; tokenizers of other checkpoints,
                 Meta's Llama 3 tokenizer.model among them (08)
    data         one string picks the text (tinyshakespeare, tinystories, hf:..., a URL, a file or folder)
    device       cuda, then mps, then cpu; the precision the hardware runs fastest
    train        the trainer: AdamW, warmup + cosine, mixed precision, exact resume
    runs         the run folder: ckpt.pt, metrics.json, one process per folder, what a resume may change, Ctrl-C
    distributed  several GPUs, one run (DDP under torchrun): join, agree, gather, leave

Finetuning a trained model (07):
    finetune     `train --init-from PATH`: the checkpoint's shape and tokenizer, the defaults of a finetune
    lora         LoRALinear (W x + alpha/r B(A x)), apply_lora, merge_lora, counting what it trains

Weights in and out (05, 06):
    checkpoints  `load_model` for our run folder, and `load_pretrained` for every format below
    weights      a state dict in Meta's names -> a checked `Llama`
    hf           Hugging Face transformers checkpoints, `from_hf`, `save_hf`
    meta         Meta's consolidated.NN.pth shards
    llama2c      karpathy/llama2.c .pt and .bin files
    gguf         llama.cpp's GGUF files: the model, its tokenizer and chat template
    files        atomic writes: a crash never leaves half a file; one training process per run folder

Around the lessons:
    chat         a chat with an instruction-tuned model through its chat template (`python -m utils chat`)
    exercises    the checkers that grade the lessons' exercises and name the mistake, one module per lesson
    report       one markdown table row per training run (`python -m utils report`)
    course       the GitHub address the notebooks' badges point to; `python -m utils` is the command line
"""
