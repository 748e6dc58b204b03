/* ==== kmed_gemma ==== */
