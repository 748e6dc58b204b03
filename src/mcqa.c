/* ==== kmed_mcqa ==== */
