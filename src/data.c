/* ==== kmed_data ==== */
