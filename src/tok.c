/* ==== kmed_tok ==== */
