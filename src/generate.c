/* ==== kmed_generate ==== */
