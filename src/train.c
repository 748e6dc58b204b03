/* ==== kmed_train ==== */
