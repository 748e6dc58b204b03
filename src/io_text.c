/* ==== kmed_io_text ==== */
