/* ---- safety ---- */
