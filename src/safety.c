/* ==== kmed_safety ==== */
