/* ==== kmed_ops ==== */
