/* ==== kmed_tensor ==== */
