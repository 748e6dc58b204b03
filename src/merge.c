/* ==== kmed_merge ==== */
