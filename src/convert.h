/* ---- gemma: model export (HF safetensors, GGUF) and random init ---- */
