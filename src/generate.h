/* ---- gemma: sampling and generation ---- */
