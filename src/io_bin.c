/* ==== kmed_io_bin ==== */
