/* Helpers shared by the tools in tools/: fatal errors, flag parsing, and a progress
   line with rate and ETA on a terminal. Tools may exit; the library never does. */
#ifndef KMED_TOOLS_COMMON_H
#define KMED_TOOLS_COMMON_H
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *kmed_tool_name = "kmed";

/* "name: what failed: message" to stderr, exit 1. */
static inline void die(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s: ", kmed_tool_name);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

/* Exits 1 with the error detail if r is not KMED_OK. */
static inline void die_if(kmed_result r, const kmed_error *err, const char *what)
{
    if (r != KMED_OK) die("%s: %s", what, err && err->msg[0] ? err->msg : kmed_result_str(r));
}

/* Misuse: message and usage to stderr, exit 2. */
static inline void usage_error(const char *usage, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s: ", kmed_tool_name);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n\n%s", usage);
    exit(2);
}

/* Flag value parsing: argv[*i] is the flag; its value is argv[*i + 1]. */
static inline const char *arg_str(int argc, char **argv, int *i, const char *usage)
{
    if (*i + 1 >= argc) usage_error(usage, "%s needs a value", argv[*i]);
    return argv[++*i];
}
static inline long arg_long(int argc, char **argv, int *i, const char *usage)
{
    const char *s = arg_str(argc, argv, i, usage);
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end) usage_error(usage, "%s: '%s' is not an integer", argv[*i - 1], s);
    return v;
}
static inline double arg_double(int argc, char **argv, int *i, const char *usage)
{
    const char *s = arg_str(argc, argv, i, usage);
    char *end;
    double v = strtod(s, &end);
    if (!*s || *end) usage_error(usage, "%s: '%s' is not a number", argv[*i - 1], s);
    return v;
}

/* Progress callback for kmed_callbacks: one redrawn line with rate and ETA when stderr
   is a terminal, a plain line every ~10% otherwise. user: a progress_state. */
typedef struct progress_state { double t0; double last_print; char what[64]; } progress_state;
static inline void progress_print(void *user, const char *what, double done, double total,
                           const char *unit)
{
    progress_state *p = (progress_state *)user;
    double now = kmed_time_now(), rate, el;
    int tty = isatty(2);
    if (strncmp(p->what, what, sizeof p->what - 1) != 0) {
        snprintf(p->what, sizeof p->what, "%s", what);
        p->t0 = now;
        p->last_print = 0;
    }
    el = now - p->t0;
    if (done < total && now - p->last_print < (tty ? 0.2 : 10.0)) return;
    p->last_print = now;
    rate = el > 0 ? done / el : 0;
    if (total > 0) {
        double eta = rate > 0 ? (total - done) / rate : 0;
        fprintf(stderr, "%s%s: %.0f/%.0f %s (%.1f%%) %.1f %s/s ETA %.0fs%s", tty ? "\r" : "",
                what, done, total, unit, 100.0 * done / total, rate, unit, eta,
                tty ? (done >= total ? "\n" : "") : "\n");
    } else {
        fprintf(stderr, "%s%s: %.0f %s %.1f %s/s%s", tty ? "\r" : "", what, done, unit, rate,
                unit, tty ? "" : "\n");
    }
    fflush(stderr);
}

static inline void log_print(void *user, kmed_log_level level, const char *msg)
{
    (void)user;
    if (level == KMED_LOG_DEBUG && !getenv("KMED_DEBUG")) return;
    fprintf(stderr, "%s: %s%s\n", kmed_tool_name, level == KMED_LOG_WARN ? "warning: " : "",
            msg);
}
#endif
