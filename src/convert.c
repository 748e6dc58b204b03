/* ==== kmed_convert ==== */
